/* edgesync console: the little the markup cannot say. No inline script anywhere
   (the Content-Security-Policy forbids it); htmx does the requests. */
(function () {
  "use strict";
  var KEEP = 100;
  // The live tail keeps the newest rows only: a screen, not a growing page.
  document.addEventListener("htmx:sseMessage", function (event) {
    var body = document.getElementById("tail-rows");
    if (!body || !body.contains(event.target) && event.target !== body) { return; }
    while (body.rows.length > KEEP) { body.deleteRow(body.rows.length - 1); }
  });
})();

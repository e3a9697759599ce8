/* edgesync console: the little the markup cannot say. No inline script anywhere
   (the Content-Security-Policy forbids it); htmx does the requests. Everything
   written here goes in with textContent, never as HTML. */
(function () {
  "use strict";
  var KEEP = 100;
  // The live tail keeps the newest rows only: a screen, not a growing page.
  document.addEventListener("htmx:sseMessage", function (event) {
    var body = document.getElementById("tail-rows");
    if (!body || !body.contains(event.target) && event.target !== body) { return; }
    while (body.rows.length > KEEP) { body.deleteRow(body.rows.length - 1); }
  });

  // -- a message where the operator looks ------------------------------------------

  function say(container, id, text, link) {
    // The newest word only: an older refusal shown on the same form would contradict it.
    var stale = container.querySelectorAll(":scope > p.error[role=alert]");
    for (var i = 0; i < stale.length; i++) {
      if (stale[i].id !== id) { stale[i].parentNode.removeChild(stale[i]); }
    }
    var box = document.getElementById(id);
    if (!box) {
      box = document.createElement("p");
      box.id = id;
      box.className = "error";
      box.setAttribute("role", "alert");
      container.insertBefore(box, container.firstChild);
    }
    box.textContent = text;
    if (link) {
      var a = document.createElement("a");
      a.href = link.href;
      a.textContent = link.text;
      box.appendChild(document.createTextNode(" "));
      box.appendChild(a);
    }
    return box;
  }

  function unsay(id) {
    var box = document.getElementById(id);
    if (box) { box.parentNode.removeChild(box); }
  }

  function main() { return document.getElementById("main") || document.body; }

  // -- live updates: a session that ended stops them, and says so --------------------

  var ended = false;

  function stopLive(source) {
    if (source) { source.close(); }
    // Without sse-connect the SSE extension has nothing to reconnect to: no 401 loop.
    var live = document.querySelectorAll("[sse-connect]");
    for (var i = 0; i < live.length; i++) {
      var data = live[i]["htmx-internal-data"];
      if (data && data.sseEventSource) { data.sseEventSource.close(); }
      live[i].removeAttribute("sse-connect");
    }
  }

  function sessionEnded(source) {
    stopLive(source);
    if (ended) { return; }
    ended = true;
    unsay("live-paused");
    var here = location.pathname + location.search;
    say(main(), "session-ended", "Your console session has ended (logged out, expired, or " +
        "the operator token was revoked): what is shown is no longer updated.",
        {href: "/ui/login?next=" + encodeURIComponent(here), text: "Log in again"});
  }

  document.addEventListener("htmx:sseOpen", function (event) {
    var source = event.detail && event.detail.source;
    unsay("live-paused");  // (a refused tail opens too: its reason follows at once)
    if (source && !source.edgesyncWatched) {
      source.edgesyncWatched = true;
      source.addEventListener("session", function () { sessionEnded(source); });
      // A live tail the API's stream limits refused: why, until a later try gets one.
      source.addEventListener("refused", function (message) {
        say(main(), "live-paused", "Live updates refused: " + message.data);
      });
    }
  });

  document.addEventListener("htmx:sseError", function (event) {
    var source = event.detail && event.detail.source;
    // CONNECTING is EventSource's own reconnect after a stream's normal end; CLOSED is a
    // refusal (a 401 without a session) or a server gone: ask which.
    if (ended || !source || source.readyState !== EventSource.CLOSED) { return; }
    fetch("/ui/session", {credentials: "same-origin", cache: "no-store"}).then(function (r) {
      if (r.status === 401) {
        sessionEnded(source);
      } else {
        say(main(), "live-paused", "Live updates are interrupted; reconnecting.");
      }
    }, function () {
      say(main(), "live-paused", "The console does not answer: live updates are " +
          "interrupted; reconnecting.");
    });
  });

  // -- a request htmx sent that failed: say why, keep what the operator typed ---------

  function place(event) {
    var elt = event.detail && (event.detail.requestConfig && event.detail.requestConfig.elt ||
                               event.detail.elt);
    var form = elt && elt.closest ? elt.closest("form") : null;
    return form || main();
  }

  function reason(xhr) {
    var type = xhr.getResponseHeader("Content-Type") || "";
    if (type.indexOf("application/json") === 0) {
      try {
        var body = JSON.parse(xhr.responseText);
        if (body && typeof body.message === "string") { return body.message; }
      } catch (ignored) { /* fall through to the status line */ }
    }
    return xhr.statusText || "no reason given";
  }

  // (A message on a form goes when the form is swapped for the answer to the next try.)
  // A refusal that is not one of the console's own HTML fragments (the API's JSON
  // error: a body over the size limit, a malformed request) is not swapped in place of
  // the form: its message is shown on the form, and the form stays as it was.
  document.addEventListener("htmx:beforeSwap", function (event) {
    var xhr = event.detail.xhr;
    var type = xhr.getResponseHeader("Content-Type") || "";
    if (xhr.status >= 400 && xhr.status < 500 && type.indexOf("text/html") !== 0) {
      event.detail.shouldSwap = false;
      event.detail.isError = false;  // shown here; htmx need not log it as well
      say(place(event), "request-error", "Refused (" + xhr.status + "): " + reason(xhr));
    }
  });

  document.addEventListener("htmx:responseError", function (event) {
    var xhr = event.detail.xhr;
    say(place(event), "request-error", "The console could not do this (" + xhr.status + "): " +
        reason(xhr) + ". Check the page before trying again.");
  });

  document.addEventListener("htmx:sendError", function (event) {
    say(place(event), "request-error", "No answer from the console (network error). If this " +
        "was a command, check Recent commands before sending it again.");
  });
})();

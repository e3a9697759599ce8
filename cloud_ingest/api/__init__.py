"""The operator API (``edgesync api``): send signed commands to edges, follow their
status, see the edges.

| method & path                          | what                                        |
| -------------------------------------- | ------------------------------------------- |
| ``POST /v1/edges/{edge}/commands``     | issue a command: 202 with its id            |
| ``GET  /v1/commands/{id}``             | one command, its lifecycle and its history  |
| ``GET  /v1/edges/{edge}/commands``     | an edge's commands (``?status=``)           |
| ``GET  /v1/edges``                     | edges, paged (``?after=&limit=``), filtered |
|                                        | (``?state=online|offline|lagging``)         |
| ``GET  /v1/dead-letters[/{id}]``, ``POST /v1/dead-letters/{id}/replay`` | dead letters: |
|                                        | list, show, replay (:mod:`cloud_ingest.dead_letters`) |
| ``/v1/edges/{edge}/labels``,           | labels, desired state, drift, rollouts      |
| ``/v1/desired/...``, ``/v1/rollouts...`` | (:mod:`~cloud_ingest.api.desired_routes`) |
| ``GET  /v1/audit``, ``/v1/operators``  | the audit log, the operators (admin scope)  |
| ``GET  /healthz``, ``/readyz``, ``/metrics``, ``/docs``, ``/openapi.json`` |       |

Issuing a command: validate the spec (422 with a message), check the edge is
known (404), sign the envelope, store the command as ``pending`` (the row is
the source of truth), then publish it to ``<prefix>.ctl.<edge>`` with the
command id as ``Nats-Msg-Id``. If NATS is unreachable the request still
succeeds; a background loop publishes stored commands JetStream has not
acknowledged. Another loop marks commands ``expired`` that are still pending
at their expiry. Status reports from the edges reach the rows through the
ingest (:mod:`cloud_ingest.command_status`).

Every request but the probes and the API's description needs
``Authorization: Bearer <operator token>`` (401 otherwise) with the route's scope
(403 otherwise): ``read``, ``operate`` / ``operate:<kind>``, ``admin``
(:mod:`cloud_ingest.operators`). Writes and 403s are audited. Refusals are JSON
``{"error": code, "message": text}``.

Rooms: :mod:`~cloud_ingest.api.models` (request and response bodies),
:mod:`~cloud_ingest.api.auth` (tokens, scopes, body limit, audit), :mod:`~cloud_ingest.api.routes`
(the HTTP surface), :mod:`~cloud_ingest.api.service` (resources, operations,
root tasks).
"""

from cloud_ingest.api.routes import create_app
from cloud_ingest.api.service import Api

__all__ = ["Api", "create_app"]

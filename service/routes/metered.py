"""The route classes every router uses: each request counted and timed by endpoint and status, whatever it raised
(a dependency or the route) made a response by `errors.error_for`, the same function the app's exception
handlers call, so that no route handles errors itself and an error reads the same wherever it was raised.

Not metered: FastAPI's own pages (`/openapi.json`, `/docs`, `/redoc`) and requests that match no route (404, 405),
which have no endpoint to be counted under."""

from __future__ import annotations

import time

from fastapi.routing import APIRoute
from starlette.responses import Response

from ..errors import error_for


class MeteredRoute(APIRoute):
    """logitserve_requests_total and logitserve_request_duration_seconds by endpoint (the route's path) and
    status."""

    counts_in_flight = False

    def get_route_handler(self):
        handler = super().get_route_handler()
        endpoint, in_flight = self.path, self.counts_in_flight

        async def metered(request) -> Response:
            metrics = request.app.state.metrics
            t0 = time.perf_counter()
            status = 500
            if in_flight:
                metrics.requests_in_flight.inc()
            try:
                try:
                    response = await handler(request)
                except Exception as exc:
                    response = error_for(request, exc)
                status = response.status_code
                return response
            finally:
                if in_flight:
                    metrics.requests_in_flight.dec()
                metrics.requests.labels(endpoint, str(status)).inc()
                metrics.request_duration.labels(endpoint, str(status)).observe(time.perf_counter() - t0)

        return metered


class WorkRoute(MeteredRoute):
    """A route that does work for its client (scoring, tokenizing): also counted in logitserve_requests_in_flight
    while it runs. Probes and scrapes are not."""

    counts_in_flight = True

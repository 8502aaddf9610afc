"""The route classes every router uses: each request counted and timed by endpoint and status, errors (raised by
a dependency or the route) answered with the contract's error body, so that no route handles them itself."""

from __future__ import annotations

import logging
import time

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.responses import Response

from ..errors import (
    ClientDisconnected,
    InternalError,
    InvalidInput,
    ServiceError,
    error_response,
    format_validation_errors,
)

logger = logging.getLogger("logitserve.app")


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
                except ServiceError as exc:
                    response = error_response(exc)
                except ClientDisconnected:
                    logger.info("%s %s: the client went away (499)", request.method, endpoint)
                    response = Response(status_code=499)
                except RequestValidationError as exc:
                    message, param = format_validation_errors(list(exc.errors()))
                    response = error_response(InvalidInput(message, param=param))
                except Exception as exc:  # a bug: say so, keep serving
                    logger.exception("request failed")
                    response = error_response(InternalError(f"{type(exc).__name__}: {exc}"))
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

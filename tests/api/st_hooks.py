"""Schemathesis hooks for bulkops: the ids the OpenAPI document cannot know.

A record type, a saved search and a batch of the token's agency exist only in the test's
database; a random id names none of them and is answered 400 or 404 whatever else the
request holds. These hooks put the real ids (from ST_RECORD_TYPE_ID, ST_SAVED_SEARCH_ID,
ST_BATCH_ID) into four cases out of five that carry an integer there, in every phase, so
that generated requests reach the logic behind the validation, and the run's warnings say
something about the document rather than about missing test data. The fifth keeps its
random id, so the "no such record type / saved search / batch" answers stay covered.
Values of another type are left alone: they are the negative cases.
"""

import itertools
import os
import threading

import schemathesis

IDS = {
    "record_type_id": os.environ.get("ST_RECORD_TYPE_ID"),
    "saved_search_id": os.environ.get("ST_SAVED_SEARCH_ID"),
}
PATH_IDS = {
    "/v1/batches/": os.environ.get("ST_BATCH_ID"),
    "/v1/saved-searches/": os.environ.get("ST_SAVED_SEARCH_ID"),
}


_COUNTER = itertools.count()
_LOCK = threading.Lock()


def _keep_random() -> bool:
    """Every fifth id seen keeps its random value."""
    with _LOCK:
        return next(_COUNTER) % 5 == 4


def _is_int(value) -> bool:
    if isinstance(value, str):
        return value.lstrip("-").isdigit()
    return isinstance(value, int) and not isinstance(value, bool)


@schemathesis.hook
def before_call(context, case, **kwargs):
    body = case.body
    if isinstance(body, dict):
        for field, real in IDS.items():
            value = body.get(field)
            if real and not isinstance(value, str) and _is_int(value) and not _keep_random():
                # A saved search replaces the filter: only where no filter is given.
                if field == "saved_search_id" and body.get("filter") is not None:
                    continue
                body[field] = int(real)
    params = case.path_parameters
    if isinstance(params, dict) and _is_int(params.get("id")):
        for prefix, real in PATH_IDS.items():
            if real and case.operation.path.startswith(prefix) and not _keep_random():
                params["id"] = real


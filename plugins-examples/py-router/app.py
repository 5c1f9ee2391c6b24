"""py-router: a helexa router written in Python (componentize-py), world `router`.

Serves where the model is ready on an answering node, least busy first (in-flight plus
queued requests; ties by node name), with the other ready replicas as fallbacks. While
the model is loading somewhere it asks the gateway to retry; otherwise it refuses with a
503 (it never loads models: cold placement stays the default router's job).

Settings (`[plugins.settings.<name>]`, JSON): {"loading_retry_ms": 500}.

The gateway gives policies no WASI (no files, clocks, network, randomness): keep to
pure computation, and report through `log.write`.
"""

import json

from wit_world import exports
from componentize_py_types import Err
from wit_world.imports import log, types

SETTINGS_KEYS = {"loading_retry_ms"}

# A component instance keeps these between calls: the gateway pushes the catalogue and
# the fleet only when they change.
_settings = {"loading_retry_ms": 500}
_catalogue = []
_fleet = types.Fleet(version=0, nodes=[])


def parse_settings(text):
    """The settings as a dict; raises ValueError naming the problem."""
    settings = json.loads(text) if text.strip() else {}
    if not isinstance(settings, dict):
        raise ValueError("settings must be a JSON object")
    unknown = set(settings) - SETTINGS_KEYS
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
    retry = settings.get("loading_retry_ms", 500)
    if not isinstance(retry, int) or isinstance(retry, bool) or not 0 <= retry < 2**32:
        raise ValueError("loading_retry_ms must be a non-negative integer")
    return {"loading_retry_ms": retry}


def resolve(name, catalogue):
    """The catalogue entry whose id, else one of whose aliases, is `name`."""
    for entry in catalogue:
        if entry.id == name:
            return entry
    for entry in catalogue:
        if name in entry.aliases:
            return entry
    return None


def answering(node):
    return node.health in (types.Health.HEALTHY, types.Health.DEGRADED)


def decide(settings, request, catalogue, fleet):
    """The routing decision for `request` (plain function: testable without a host)."""
    entry = resolve(request.model, catalogue)
    if entry is None:
        return types.Decision_Reject(types.Rejection(
            status=404, message=f"model {request.model} is not in the catalogue", retry_after_ms=None))
    replicas = []
    loading = False
    for node in fleet.nodes:
        if not answering(node):
            continue
        for model in node.models:
            if model.id != entry.id:
                continue
            if model.state == types.ModelState.READY:
                replicas.append((model.in_flight + model.queue_depth, node.name))
            elif model.state == types.ModelState.LOADING:
                loading = True
    if replicas:
        replicas.sort()
        names = [name for _, name in replicas]
        return types.Decision_Serve(types.ServePlan(node=names[0], fallbacks=names[1:]))
    if loading:
        return types.Decision_RetryAfter(settings["loading_retry_ms"])
    return types.Decision_Reject(types.Rejection(
        status=503,
        message=f"model {entry.id} is not loaded on any answering node (this router never loads models)",
        retry_after_ms=5000))


class Routing(exports.Routing):
    def configure(self, settings):
        global _settings
        try:
            _settings = parse_settings(settings)
        except ValueError as error:  # json.JSONDecodeError is a ValueError too
            raise Err(types.PolicyError_BadSettings(str(error)))

    def set_catalogue(self, entries):
        global _catalogue
        _catalogue = entries

    def set_fleet(self, fleet):
        global _fleet
        _fleet = fleet

    def route(self, request):
        return decide(_settings, request, _catalogue, _fleet)

"""The flows take the typed configuration, so Prefect builds a form from its schema."""

import pytest
from prefect.utilities.callables import parameter_schema

from flows.pipeline import pipeline_flow, run_flow, stage_flow
from rae_core.errors import ConfigError


def _fields(schema: dict, param: str) -> dict:
    ref = schema.definitions[schema.properties[param]["$ref"].rsplit("/", 1)[-1]] \
        if "$ref" in schema.properties[param] else None
    if ref is None:  # Optional[Config]: the model is one branch of anyOf
        (branch,) = [b for b in schema.properties[param]["anyOf"] if "$ref" in b]
        ref = schema.definitions[branch["$ref"].rsplit("/", 1)[-1]]
    return ref["properties"]


@pytest.mark.parametrize("flow_fn, param", [(pipeline_flow, "cfg"), (stage_flow, "cfg"),
                                            (run_flow, "params")])
def test_the_config_is_a_typed_form_with_every_section(flow_fn, param):
    schema = parameter_schema(flow_fn.fn)
    fields = _fields(schema, param)
    assert {"data", "encoder", "decoder", "generator", "sample", "evaluate"} <= set(fields)
    generator = schema.definitions[fields["generator"]["$ref"].rsplit("/", 1)[-1]]
    assert generator["properties"]["steps"]["default"] == 700  # the embedded default


def test_a_deployment_run_names_a_bad_stage_to_force():
    with pytest.raises(ConfigError, match=r"force=trian-decoder: not a stage \(valid: prepare"):
        run_flow.fn(force=["trian-decoder"])

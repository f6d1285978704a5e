"""torch.compile(fullgraph=True) of a training step of ILPG and SAGE on zslfast ops: one graph, no graph break, and
no recompile across steps (SAGE's bank fills at its first step, so its second runs Eq. 9). Dynamo's tracing alone
(backend "eager"): what breaks a graph or recompiles is decided there, inductor adds nothing to it.
"""

import pytest
import torch
import torch._dynamo

import test_models_ilpg as ilpg_tests
import test_models_sage as sage_tests


def ilpg(generator):
    model = ilpg_tests._tiny(generator, dtype=torch.float32)
    regions, signatures, labels = ilpg_tests._batch(generator, dtype=torch.float32)
    return model, dict(regions=regions, signatures=signatures, labels=labels)


def sage(generator):
    model = sage_tests.make_model(generator, dtype=torch.float32)
    labels = torch.randint(0, sage_tests.C, (sage_tests.B,), generator=generator)
    return model, dict(hidden_states=sage_tests.make_states(generator, torch.float32), labels=labels)


@pytest.mark.parametrize("make", [ilpg, sage], ids=["ILPG", "SAGE"])
def test_training_steps_compile_to_one_graph_without_recompiles(make, generator):
    model, inputs = make(generator)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-3)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            loss = compiled(**inputs).loss
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    assert torch.isfinite(loss)

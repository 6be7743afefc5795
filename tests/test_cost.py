"""The cost of one recognition (the paper's Figs. 11 and 12 measures): multiply-adds layer by
layer and the memory of the parameters, against numbers worked out by hand from the
architecture. A bias counts as one multiply-add (a connection from an input fixed at 1),
as the paper counts its connections."""

from __future__ import annotations

import json

import jax
import pytest

from lenet_jax.cli.evaluate import main as eval_main
from lenet_jax.layers import C3_TABLE
from lenet_jax.model import LeNet5, init_params, layer_table, recognition_cost

# C1: 6 maps x 28x28 units x (5x5 weights + 1 bias)          = 6 * 784 * 26      = 122,304
# S2: 6 maps x 14x14 units x (4 inputs + 1 bias)             = 6 * 196 * 5       =   5,880
# C3: table I connects 6x3 + 6x4 + 3x4 + 1x6 = 60 map pairs, so a position of the 16
#     maps takes 60 x 25 weights + 16 biases = 1,516; x 10x10 positions          = 151,600
# S4: 16 maps x 5x5 units x (4 + 1)                          = 16 * 25 * 5       =   2,000
# C5: 120 units x (16 maps x 5x5 weights + 1 bias), one position = 120 * 401      =  48,120
# F6: 84 units x (120 + 1)                                   = 84 * 121          =  10,164
# RBF: 10 classes x 84 squared differences                   = 10 * 84           =     840
# total                                                                           = 340,908
HAND = {
    "C1": 6 * 28 * 28 * (5 * 5 + 1),
    "S2": 6 * 14 * 14 * (4 + 1),
    "C3": 10 * 10 * ((6 * 3 + 6 * 4 + 3 * 4 + 1 * 6) * 5 * 5 + 16),
    "S4": 16 * 5 * 5 * (4 + 1),
    "C5": 120 * (16 * 5 * 5 + 1),
    "F6": 84 * (120 + 1),
    "output (RBF)": 10 * 84,
}


def shapes(**options) -> tuple[LeNet5, dict]:
    model = LeNet5(**options)
    return model, jax.eval_shape(lambda: init_params(model, jax.random.key(0)))


def test_the_hand_counts_are_the_papers():
    assert sum(len(inputs) for inputs in C3_TABLE) == 60
    assert HAND == {"C1": 122_304, "S2": 5_880, "C3": 151_600, "S4": 2_000, "C5": 48_120, "F6": 10_164, "output (RBF)": 840}
    assert sum(HAND.values()) == 340_908


def test_multiply_adds_layer_by_layer_match_the_hand_count():
    model, params = shapes()
    assert {r["layer"]: r["connections"] for r in layer_table(params, model.c3_table)} == HAND
    assert recognition_cost(params, model.c3_table).multiply_adds == 340_908


def test_the_memory_of_the_parameters():
    # 156 + 12 + 1,516 + 32 + 48,120 + 10,164 = 60,000 float32 parameters: 240,000 bytes.
    # As held, C3's kernel is whole: 5x5x6x16 = 2,400 entries, of which 900 (36 unconnected
    # map pairs x 25) are zeros, so 60,900 floats: 243,600 bytes.
    model, params = shapes()
    cost = recognition_cost(params, model.c3_table)
    assert (cost.parameters, cost.parameter_bytes, cost.held_bytes) == (60_000, 240_000, 243_600)
    assert 5 * 5 * 6 * 16 - 60 * 25 == 900


def test_a_dense_c3_and_a_softmax_head_cost_what_they_add():
    # Dense C3: 10x10 x (16 x 6 x 25 + 16) = 241,600 multiply-adds; 2,416 parameters.
    model, params = shapes(c3="dense")
    cost = recognition_cost(params, model.c3_table)
    assert {r["layer"]: r["connections"] for r in layer_table(params, model.c3_table)}["C3"] == 241_600
    assert cost.multiply_adds == 340_908 - 151_600 + 241_600
    assert cost.parameters == 60_000 + 900 and cost.parameter_bytes == cost.held_bytes == 4 * 60_900
    # Softmax head: 84 x 10 weights + 10 biases = 850, where the RBF has 840 and no parameters.
    model, params = shapes(head="softmax")
    cost = recognition_cost(params, model.c3_table)
    assert cost.multiply_adds == 340_908 - 840 + 850 and cost.parameters == 60_850


def test_eval_summary_prints_the_cost_beside_the_papers(capsys):
    assert eval_main(["--summary"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "multiply-adds per recognition: 340,908 (paper: about 340,000)" in out
    assert any(line.startswith("parameter memory: 240,000 bytes, 60,000 float32 parameters (paper: about 60,000 "
                               "parameters, no figure in bytes); 243,600 bytes as held") for line in out)
    assert any(line.startswith("counted: ") and "60 map pairs" in line for line in out)
    assert out[-1].split() == ["total", "60,000", "340,908"]


def test_eval_summary_json_holds_the_layers_and_the_cost(capsys):
    assert eval_main(["--summary", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {r["layer"]: r["connections"] for r in summary["layers"]} == HAND
    cost = summary["cost"]
    assert (cost["multiply_adds"], cost["parameters"], cost["parameter_bytes"], cost["held_bytes"]) == (340_908, 60_000, 240_000, 243_600)
    assert cost["paper_about"] == {"multiply_adds": 340_000, "parameters": 60_000, "parameter_bytes": None}
    assert "squashing not counted" in cost["counting"]


@pytest.mark.parametrize("options, c3_multiply_adds", [({}, 151_600), ({"c3": "dense"}, 241_600)])
def test_the_c3_count_follows_the_table_the_model_is_built_with(options, c3_multiply_adds):
    model, params = shapes(**options)
    assert (model.c3_table is None) == ("c3" in options)
    assert {r["layer"]: r["connections"] for r in layer_table(params, model.c3_table)}["C3"] == c3_multiply_adds

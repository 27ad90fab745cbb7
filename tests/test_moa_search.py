"""Plan search: the MILP meets every constraint and finds the brute-force optimum."""

import itertools

import numpy as np
import pytest

from kvjax.moa.__main__ import main as moa_main
from kvjax.moa.search import (InfeasibleBudget, build_space, candidates, check_feasible,
                              density_of, dropped_blocks, loss_of, rule_grid, solve, to_plan)

BLOCK = 16


def random_space(layers, kv_heads, heads, lengths, seed=0):
  rng = np.random.default_rng(seed)
  influence = {n: rng.random((layers, heads, n // BLOCK, n // BLOCK)) for n in lengths}
  rules = rule_grid(alphas=range(-64, 257, 64), betas=np.arange(0, 1.01, 0.25), lengths=lengths)
  return build_space(influence, rules, num_kv_heads=kv_heads, block=BLOCK, sink=BLOCK)


def test_dropped_blocks_by_hand():
  # 4 blocks, a band of one block: query block 3 drops key blocks 1 and 2 (0 is the sink).
  d = dropped_blocks(1, 4)
  assert list(np.nonzero(d[3])[0]) == [1, 2]
  assert not d[1].any()


@pytest.mark.parametrize("budget", [0.5, 0.3])
def test_every_candidate_respects_the_constraints(budget):
  space = random_space(layers=4, kv_heads=2, heads=4, lengths=(128, 256, 512))
  found = candidates(space, budget=budget, max_rules=2)
  assert found
  for choice in found:
    d = density_of(space, choice)
    assert np.all(d <= budget + 1e-9) and np.all(d >= 0.9 * budget - 1e-9), d
    for layer in range(4):
      assert len(set(choice[2 * layer:2 * layer + 2])) <= 2
  plan = to_plan(space, found[0], num_heads=4)
  assert plan.shape == (4, 4)
  assert plan.alphas[0][0] == plan.alphas[0][1]  # a GQA group shares its rule


def test_solver_finds_the_brute_force_optimum():
  space = random_space(layers=3, kv_heads=1, heads=2, lengths=(256,), seed=3)
  n_rules = len(space.rules)
  best = np.inf
  for choice in itertools.product(range(n_rules), repeat=3):
    choice = np.array(choice)
    d = density_of(space, choice)[0]
    if 0.45 - 1e-9 <= d <= 0.5 + 1e-9:
      best = min(best, loss_of(space, choice)[0])
  got = solve(space, budget=0.5, max_rules=1, weights=np.ones(1))
  assert loss_of(space, got)[0] == pytest.approx(best)


def test_at_most_k_rules_per_layer_binds():
  space = random_space(layers=1, kv_heads=4, heads=4, lengths=(256,), seed=1)
  for k in (1, 2):
    choice = solve(space, budget=0.5, max_rules=k, weights=np.ones(1))
    assert len(set(choice)) <= k


def test_infeasible_budget_is_a_clear_error():
  space = random_space(layers=2, kv_heads=1, heads=1, lengths=(128,))
  with pytest.raises(ValueError, match="no plan meets the density bounds"):
    candidates(space, budget=0.01)


@pytest.mark.parametrize("budget, feasible", [(0.5, True), (0.01, False)])
def test_feasibility_is_known_before_profiling(budget, feasible):
  lengths = (128, 256)
  space = random_space(layers=2, kv_heads=1, heads=1, lengths=lengths)
  check = lambda: check_feasible(space.rules, lengths, num_layers=2, num_kv_heads=1, block=BLOCK,
                                 sink=BLOCK, budget=budget, max_rules=2)
  if feasible:
    check()
    assert candidates(space, budget=budget)
  else:
    with pytest.raises(InfeasibleBudget, match="no plan meets the density bounds"):
      check()
    with pytest.raises(InfeasibleBudget):
      candidates(space, budget=budget)


def test_plan_cli_rejects_an_infeasible_grid_before_loading_a_model(tmp_path, capsys):
  config = tmp_path / "c.yaml"
  config.write_text("model: {max_seq_len: 512}\n")
  with pytest.raises(SystemExit) as e:  # no weights or checkpoint: the grid is checked first
    moa_main(["plan", "--config", str(config), "--out", str(tmp_path / "p.json"),
              "--lengths", "256", "--response-tokens", "16", "--density", "0.05"])
  assert e.value.code == 2
  assert "no plan meets the density bounds [0.045, 0.05]" in capsys.readouterr().err
  assert not (tmp_path / "p.json").exists()

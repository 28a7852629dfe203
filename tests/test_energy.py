"""The energy formula on hand-computed cases, and the organism's energy meter."""

import pytest

from gsnn.config import OrganismConfig
from gsnn.energy import MAC_JOULES, SYNOP_JOULES, decision_energy
from gsnn.organism import EnergyMeter


def test_decision_energy_hand_computed():
    # 12 active inputs, 30 hidden spikes, 100 hidden neurons, 450 inputs, 4 actions, T = 10.
    e = decision_energy(12, 30, 100, 450, 4, 10)
    assert e.synops_per_decision == 12 * 10 * 100 + 30 * 4  # 12120
    assert e.energy_per_decision_joules == pytest.approx(12120 * 0.9e-12)
    assert e.dense_ann_macs_per_decision == 450 * 100 + 100 * 4  # 45400
    assert e.dense_ann_energy_per_decision_joules == pytest.approx(45400 * 4.6e-12)
    assert e.sparse_ann_macs_per_decision == 12 * 100 + 100 * 4  # 1600
    assert e.sparse_ann_energy_per_decision_joules == pytest.approx(1600 * 4.6e-12)
    assert SYNOP_JOULES == 0.9e-12 and MAC_JOULES == 4.6e-12
    silent = decision_energy(0, 0, 64, 450, 4, 10)
    assert silent.synops_per_decision == 0 and silent.energy_per_decision_joules == 0


def test_energy_meter_mean_equals_the_mean_of_per_decision_energies():
    """The meter keeps sums per hidden size; its report must equal averaging decision_energy over
    every decision, weighted by worlds, across a change of size."""
    config = OrganismConfig()
    meter = EnergyMeter(config)
    decisions = [(25.0 * 8, 130.0 * 8, 8, 64), (31.0 * 8, 90.0 * 8, 8, 64), (12.0 * 4, 400.0 * 4, 4, 96)]
    for active, spikes, worlds, hidden in decisions:
        meter.add(active, spikes, worlds, hidden)
    expected, total_worlds = {}, 0
    for active, spikes, worlds, hidden in decisions:
        energy = decision_energy(active / worlds, spikes / worlds, hidden, 450, 4, config.snn_steps).as_dict()
        for key, value in dict(energy, hidden_neurons=hidden).items():
            expected[key] = expected.get(key, 0.0) + value * worlds
        total_worlds += worlds
    report = meter.report()
    assert meter.world_decisions == total_worlds == 20
    for key, value in expected.items():
        assert report[key] == pytest.approx(value / total_worlds), key
    assert len(meter._totals) == 2  # one entry per hidden size, whatever the number of decisions
    meter.reset()
    assert meter.report() == {}

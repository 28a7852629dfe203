"""Energy per decision, by the SNN literature's convention (Horowitz 2014, 45 nm, 32-bit float).

One synaptic operation (SynOp: one spike delivered to one target) is an add, 0.9 pJ; one dense
multiply-accumulate (MAC) is 4.6 pJ. For one decision of one world, with ``a`` active input
cells (sum of the observation, which is 0/1), ``s`` hidden spikes over the decision, ``H`` hidden
neurons, ``A`` actions, ``N`` inputs and ``T`` SNN steps:

    SynOps           = a * T * H   (each active input spikes at every SNN step, fan-out H)
                     + s * A       (each hidden spike reaches the A readout units)
    E_snn            = SynOps * 0.9 pJ              (the SNN does no dense MACs)
    E_dense_ann      = (N * H + H * A) * 4.6 pJ     (the same 450-H-4 shape run as an ANN)
    E_sparse_ann     = (a * H + H * A) * 4.6 pJ     (that ANN skipping zero inputs; the hidden
                                                     layer counted dense)

Neuron state updates (leak, threshold) are not counted, as is usual for SynOp counts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

SYNOP_JOULES = 0.9e-12
MAC_JOULES = 4.6e-12


@dataclass(frozen=True)
class DecisionEnergy:
    synops_per_decision: float
    energy_per_decision_joules: float
    dense_ann_macs_per_decision: float
    dense_ann_energy_per_decision_joules: float
    sparse_ann_macs_per_decision: float
    sparse_ann_energy_per_decision_joules: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def decision_energy(
    active_inputs: float,
    hidden_spikes: float,
    hidden_neurons: int,
    n_inputs: int,
    n_actions: int,
    snn_steps: int,
) -> DecisionEnergy:
    """Energy of one decision of one world; the first two arguments are per-decision means."""
    synops = active_inputs * snn_steps * hidden_neurons + hidden_spikes * n_actions
    dense_macs = n_inputs * hidden_neurons + hidden_neurons * n_actions
    sparse_macs = active_inputs * hidden_neurons + hidden_neurons * n_actions
    return DecisionEnergy(
        synops_per_decision=float(synops),
        energy_per_decision_joules=float(synops * SYNOP_JOULES),
        dense_ann_macs_per_decision=float(dense_macs),
        dense_ann_energy_per_decision_joules=float(dense_macs * MAC_JOULES),
        sparse_ann_macs_per_decision=float(sparse_macs),
        sparse_ann_energy_per_decision_joules=float(sparse_macs * MAC_JOULES),
    )

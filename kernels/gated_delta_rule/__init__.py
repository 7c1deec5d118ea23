"""Gated DeltaNet on Pallas: the shared delta kernels (``kernels.delta``) with scalar gates."""

from ..delta import delta_pallas, supports


def gated_delta_rule_pallas(q, k, v, g, beta, *, scale, initial_state, output_final_state,
                            segment_ids, interpret=False, backend="auto"):
    return delta_pallas(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                        output_final_state=output_final_state, segment_ids=segment_ids,
                        interpret=interpret, backend=backend)


__all__ = ["gated_delta_rule_pallas", "supports"]

"""DeltaNet on Pallas: the shared delta kernels (``kernels.delta``) without gates."""

from ..delta import delta_pallas, supports


def delta_rule_pallas(q, k, v, beta, *, scale, initial_state, output_final_state, segment_ids,
                      interpret=False, backend="auto"):
    return delta_pallas(q, k, v, None, beta, scale=scale, initial_state=initial_state,
                        output_final_state=output_final_state, segment_ids=segment_ids,
                        interpret=interpret, backend=backend)


__all__ = ["delta_rule_pallas", "supports"]

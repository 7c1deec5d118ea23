"""GPT-2 Medium with Gated DeltaNet in every block (head dims 64/64), otherwise as the GLA reference run."""

from configs import gpt2_medium_gla


def get_config():
    c = gpt2_medium_gla.get_config()
    c.model.update(attn="gated_deltanet", expand_k=1.0, expand_v=1.0)
    return c

"""A learned mix of the encoder's layers, which the classifier's pooling reads (config.json layer_mix, train.py
--layer-mix): ELMo's scalar mix (Peters et al., 2018), so that training can down-weight the top layers instead of
reading the last one alone.

LayerMix   scale * sum_l softmax(weights)_l * state_l over the embedding output and each layer's output (model.py's
    encoders give them with all_states; ModernBERT's each through its final norm)

Its parameters are the classifier's layer_mix.weights and layer_mix.scale; side/remote_code.py copies this class into
a folder's modeling file, so transformers mixes transformers' hidden states the same way.
"""
import torch
import torch.nn as nn


class LayerMix(nn.Module):
    """One weight per hidden state and one scale. At first the states' plain mean: weights 0, scale 1."""

    def __init__(self, num_states):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(num_states))
        self.scale = nn.Parameter(torch.ones(1))  # one element, not 0-d: FSDP2 (train.py --fsdp) refuses scalars

    def forward(self, states):
        """states: a list of [.., H] (padded or packed alike) -> their mix, shaped as each. The scale goes into the
        coefficients (float: a stable softmax under autocast), cast to the states' dtype: no extra pass over them."""
        coefficients = (self.scale * self.weights.float().softmax(0)).to(states[0].dtype)
        return sum(c * state for c, state in zip(coefficients, states))

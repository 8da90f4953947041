"""The fused embeddings forward that `patch` binds (with its "layer_norm" flag) to ElectraEmbeddings, BertEmbeddings
and RobertaEmbeddings: word + position + token-type rows, LayerNorm and dropout as one ops.embeddings_layer_norm.

Same semantics as transformers' forward: default position ids are the registered buffer sliced from the cache length
(transformers 5.24 names that argument `cache_length`, 5.17 `past_key_values_length`; both are taken), or for
RoBERTa HF's padding-aware positions from the input ids; default token types are type 0 (transformers gathers them
from its all-zero buffer); dropout follows the dropout module's training flag; the padding indices of the word (and
RoBERTa's position) tables keep their gradient rows zero. `inputs_embeds` goes to transformers' own forward.

Under autocast the output is in the autocast dtype (fp32 tables, LayerNorm parameters and statistics): transformers
returns fp32 here, which its next matmul (or the patched encoder's residual stream) casts down anyway, one more pass
over the activations that this makes unnecessary.
"""

import torch
from transformers.models.bert import modeling_bert as bert
from transformers.models.electra import modeling_electra as electra
from transformers.models.roberta import modeling_roberta as roberta

from .. import ops
from .forwards import _autocast_dtype, _no_autocast

EMBEDDINGS = (electra.ElectraEmbeddings, bert.BertEmbeddings, roberta.RobertaEmbeddings)


def embeddings_forward(
    self, input_ids: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None, cache_length: int = 0, *,
    past_key_values_length: int = 0,
) -> torch.Tensor:
    """ElectraEmbeddings / BertEmbeddings / RobertaEmbeddings.forward through ops.embeddings_layer_norm."""
    past = cache_length + past_key_values_length  # one of them is the release's name, the other stays 0
    if inputs_embeds is not None or input_ids is None:
        return type(self).forward(self, input_ids, token_type_ids, position_ids, inputs_embeds, past)
    if position_ids is None:
        if isinstance(self, roberta.RobertaEmbeddings):
            position_ids = self.create_position_ids_from_input_ids(input_ids, self.padding_idx, past)
        else:
            position_ids = self.position_ids[:, past: input_ids.shape[1] + past]
    word, position, norm = self.word_embeddings, self.position_embeddings, self.LayerNorm
    dropout_p = self.dropout.p if self.dropout.training else 0.0
    out_dtype = _autocast_dtype(input_ids.device)  # read before the op's own code leaves autocast
    with _no_autocast(input_ids.device):
        return ops.embeddings_layer_norm(
            input_ids, position_ids, token_type_ids, word.weight, position.weight, self.token_type_embeddings.weight,
            norm.weight, norm.bias, norm.eps, dropout_p, out_dtype=out_dtype,
            word_padding_idx=word.padding_idx, position_padding_idx=position.padding_idx,
        )

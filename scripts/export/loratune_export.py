"""Writes loratune model bundles: a TorchScript file plus its metadata (docs/bundle-format.md).

A bundle's forward maps a normalised image batch [N,3,H,W] to pooled features [N,D]. It also has the methods
`stem(images) -> hidden` and `head(hidden) -> features`; the transformer blocks between them sit at the module path
named by the metadata field "blocks", so loratune can checkpoint block by block.

Wrappers keep the original model's module names, so adapter files use the same paths as PEFT on that model.
"""
import gzip
import json
import os

import torch
from torch import nn
from torch._jit_internal import FunctionModifiers

METADATA_NAME = "loratune.json"
FORMAT_VERSION = 1
MERGES_NAME = "bpe_merges.txt"  # CLIP's BPE merges inside a text bundle


class BundleWrapper(nn.Module):
    """Base class: subclasses define forward() = head(blocks(stem(images))), stem(), head() and blocks_path."""

    blocks_path = ""

    def block_list(self):
        m = self
        for part in self.blocks_path.split("."):
            m = getattr(m, part)
        return m


def _script(wrapper):
    cls = type(wrapper)
    exported = [cls.stem, cls.head]
    for fn in exported:
        fn._torchscript_modifier = FunctionModifiers.EXPORT
    try:
        return torch.jit.script(wrapper)
    finally:
        for fn in exported:
            del fn._torchscript_modifier


def export_bundle(wrapper, metadata, path, mode="trace", example=None):
    """Scripts or traces `wrapper` and saves it with `metadata`. Returns the TorchScript module.

    Tracing happens with gradients enabled and the model in eval mode: traced under torch.no_grad(), PyTorch records
    fused inference-only attention kernels that have no backward, and training the bundle would fail.
    """
    wrapper = wrapper.eval()
    size = metadata["image_size"]
    if example is None:
        example = torch.randn(2, 3, size, size)
    with torch.enable_grad():
        if mode == "script":
            module = _script(wrapper)
        elif mode == "trace":
            hidden = wrapper.stem(example)
            module = torch.jit.trace_module(
                wrapper, {"forward": example, "stem": example, "head": _last_hidden(wrapper, hidden)}, check_trace=False
            )
        else:
            raise ValueError(f"mode must be 'script' or 'trace', not {mode!r}")
    with torch.no_grad():
        expected = wrapper(example)
        got = module(example)
    if expected.shape[-1] != metadata["feature_dim"]:
        raise ValueError(f"features have {expected.shape[-1]} dimensions, metadata says {metadata['feature_dim']}")
    err = (expected - got).abs().max().item()
    if err > 1e-4:
        raise RuntimeError(f"exported module differs from the eager model by {err}")
    if mode == "trace" and "aten::_native_multi_head_attention" in str(module.inlined_graph):
        raise RuntimeError("the trace recorded aten::_native_multi_head_attention (no backward); trace with grad enabled")
    meta = {"format": FORMAT_VERSION, "kind": "backbone", "blocks": wrapper.blocks_path, **metadata}
    torch.jit.save(module, path, _extra_files={METADATA_NAME: json.dumps(meta, indent=2)})
    return module


def _last_hidden(wrapper, hidden):
    with torch.no_grad():
        h = hidden
        for block in wrapper.block_list():
            h = block(h)
            if isinstance(h, tuple):
                h = h[0]
    return h.detach()


def read_metadata(path):
    files = {METADATA_NAME: ""}
    torch.jit.load(path, _extra_files=files)
    return json.loads(files[METADATA_NAME])


# ---- CLIP text towers ----------------------------------------------------------------------------------------------


def read_merges(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()


def find_merges():
    """CLIP's merges file from the user's open_clip or mobileclip install."""
    for package in ("open_clip", "mobileclip"):
        try:
            mod = __import__(package)
        except ImportError:
            continue
        for folder in getattr(mod, "__path__", []):  # a package's folders (a namespace package has no __file__)
            for root, _, files in os.walk(folder):
                if "bpe_simple_vocab_16e6.txt.gz" in files:
                    return os.path.join(root, "bpe_simple_vocab_16e6.txt.gz")
    raise SystemExit("error: cannot find bpe_simple_vocab_16e6.txt.gz in open_clip or mobileclip; pass --merges")


def export_text(wrapper, merges_text, metadata, path, context_length=77):
    """Traces a text encoder (tokens [N, context] int64 -> embeddings [N, D]) and saves it with CLIP's merges file
    inside (kind "text_encoder", tokenizer "clip_bpe"). Traced with gradients enabled: adapters train through it."""
    wrapper = wrapper.eval()
    n_merges = min(len([line for line in merges_text.split("\n")[1:] if line.strip()]), 48894)  # as CLIP's vocabulary
    sot, eot = 512 + n_merges, 513 + n_merges
    example = torch.zeros(2, context_length, dtype=torch.long)
    example[:, 0], example[:, 1:4], example[:, 4] = sot, 300, eot
    with torch.enable_grad():
        module = torch.jit.trace(wrapper, example, check_trace=False)
    if "aten::_native_multi_head_attention" in str(module.inlined_graph):
        raise RuntimeError("the trace recorded aten::_native_multi_head_attention (no backward); trace with grad enabled")
    meta = {"format": FORMAT_VERSION, "kind": "text_encoder", "tokenizer": "clip_bpe", "context_length": context_length,
            "merges_file": MERGES_NAME, "sot": sot, "eot": eot, **metadata}
    torch.jit.save(module, path, _extra_files={METADATA_NAME: json.dumps(meta, indent=2), MERGES_NAME: merges_text})
    return module


def preprocessing(transforms):
    """Bundle preprocessing fields from an evaluation transform (torchvision Compose: Resize, CenterCrop, Normalize)."""
    meta = {"mean": [0.0] * 3, "std": [1.0] * 3}
    for t in transforms.transforms:
        name = type(t).__name__
        size = getattr(t, "size", None)
        size = size[0] if isinstance(size, (list, tuple)) else size
        if name == "Resize":
            meta["resize_size"], meta["interpolation"] = int(size), t.interpolation.value
        elif name == "CenterCrop":
            meta["image_size"] = int(size)
        elif name == "Normalize":
            meta["mean"], meta["std"] = list(t.mean), list(t.std)
    return meta


# ---- wrappers for the supported layouts ---------------------------------------------------------------------------


class HFViT(BundleWrapper):
    """Hugging Face transformers ViTModel (e.g. from ViTForImageClassification.vit). Paths: vit.encoder.layer.N..."""

    blocks_path = "vit.encoder.layer"

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, images):
        h = self.stem(images)
        for layer in self.vit.encoder.layer:
            out = layer(h)
            h = out[0] if isinstance(out, tuple) else out
        return self.head(h)

    def stem(self, images):
        return self.vit.embeddings(images)

    def head(self, hidden):
        return self.vit.layernorm(hidden)[:, 0]


class HFViTLayers(HFViT):
    """A transformers ViTModel whose layer list is not at encoder.layer (later transformers versions): the list, the
    embeddings and the final LayerNorm are found by type. Trace only."""

    def __init__(self, vit):
        super().__init__(vit)
        children = dict(vit.named_children())
        lists = [n for n, m in vit.named_modules() if isinstance(m, nn.ModuleList)]
        norms = [n for n, m in children.items() if isinstance(m, nn.LayerNorm)]
        if not lists or not norms or "embeddings" not in children:
            raise ValueError(f"unknown ViTModel layout (children: {', '.join(children)}): export needs embeddings, "
                             "a list of layers and a final LayerNorm")
        self.blocks_path = "vit." + lists[0]
        self.norm_name = norms[-1]

    def forward(self, images):
        h = self.stem(images)
        for layer in self.block_list():
            out = layer(h)
            h = out[0] if isinstance(out, tuple) else out
        return self.head(h)

    def head(self, hidden):
        return getattr(self.vit, self.norm_name)(hidden)[:, 0]


def hf_vit_wrapper(vit):
    """The bundle wrapper for a transformers ViTModel of any version."""
    return HFViT(vit) if hasattr(vit, "encoder") else HFViTLayers(vit)


class TimmViT(BundleWrapper):
    """timm VisionTransformer (fused qkv Linear). Paths: model.blocks.N.attn.qkv (PEFT on timm: blocks.N.attn.qkv)."""

    blocks_path = "model.blocks"

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.head(self.model.blocks(self.stem(images)))

    def stem(self, images):
        x = self.model.patch_embed(images)
        x = self.model._pos_embed(x)
        x = self.model.patch_drop(x)
        return self.model.norm_pre(x)

    def head(self, hidden):
        return self.model.forward_head(self.model.norm(hidden), pre_logits=True)


class TorchvisionViT(BundleWrapper):
    """torchvision VisionTransformer (nn.MultiheadAttention, fused in_proj_weight). Paths: model.encoder.layers..."""

    blocks_path = "model.encoder.layers"

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.head(self.model.encoder.layers(self.stem(images)))

    def stem(self, images):
        m = self.model
        x = m._process_input(images)
        cls = m.class_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        return m.encoder.dropout(x + m.encoder.pos_embedding)

    def head(self, hidden):
        return self.model.encoder.ln(hidden)[:, 0]

"""The plan's network in PyTorch with every parameter a view of the plan's one copy of the weights.

The network is built from the plan's config on the meta device, so the constructor allocates no
weight; then each parameter becomes a view of its stored tensor in the weights buffer (read once; on
CUDA uploaded once, as one allocation), found through the manifest's `weights.parameters`. Linear
weights that the ONNX exporter stored transposed are transposed back in place inside that buffer, so
every kernel sees PyTorch's usual layout (CPU fp16 GEMMs on transposed views are several times slower)
and no second copy exists. A dtype other than the stored one (e.g. bf16 from an fp32 plan) casts each
weight once at load into a tensor of its own and the buffer is freed.
"""

from __future__ import annotations

import torch

from schedules.errors import BlockcacheError

from ..nn.build import build_model
from ..plan import Plan
from ..plan.files import read_weights


def plan_storage(plan: Plan, device: str) -> torch.Tensor:
    """The plan's weights file as one uint8 tensor on `device` (one upload, one device allocation)."""
    storage = torch.from_numpy(read_weights(plan))
    return storage.to(device) if device.startswith("cuda") else storage


def model_from_plan(plan: Plan, dtype: torch.dtype, storage: torch.Tensor) -> torch.nn.Module:
    """The plan's network in eval mode, parameters in `dtype` on the device of `storage`
    (`plan_storage`), sharing that weights buffer."""
    params = plan.weights.parameters
    if not params:
        raise BlockcacheError("plan has no PyTorch parameter map (weights.parameters): re-export it for "
                              "the torch backend")
    with torch.device("meta"):
        model = build_model(plan.config)
    model = _bind_parameters(model, params, plan, storage, dtype)
    model.name = plan.model_name
    return model


def decoder_from_plan(plan: Plan, storage: torch.Tensor) -> torch.nn.Module:
    """The plan's image decoder (runtime/nn/decoder.py: diffusers' AutoencoderKL decoder) in float32 on
    the device of `storage`, its parameters views of that weights buffer."""
    from ..nn.decoder import ImageDecoder, autoencoder_from_config

    decoder = ImageDecoder(autoencoder_from_config(plan.decoder.config), plan.decoder.scaling_factor)
    return _bind_parameters(decoder, plan.decoder.parameters, plan, storage, torch.float32)


def _bind_parameters(model: torch.nn.Module, params: dict, plan: Plan, storage: torch.Tensor,
                     dtype: torch.dtype) -> torch.nn.Module:
    """`model` (built on the meta device) with each parameter a view of its stored tensor in `storage`."""
    tensors = plan.weights.tensors

    expected = dict(model.named_parameters())
    missing = sorted(set(expected) - set(params))
    if missing:
        raise BlockcacheError(f"plan weights lack parameter {missing[0]!r}: re-export the plan")
    # A stored tensor that every user reads transposed is transposed back in place, once.
    uses = {}
    for name in expected:
        uses.setdefault(params[name].tensor, set()).add(params[name].transposed)
    views = {}
    for name, meta in expected.items():
        source = params[name]
        t = tensors[source.tensor]  # float32 or float16 (the plan's precision), its length checked: Plan.parse
        stored_dtype = getattr(torch, t.dtype)
        shape = tuple(reversed(t.shape)) if source.transposed else tuple(t.shape)
        if (source.transposed and len(t.shape) != 2) or shape != tuple(meta.shape):
            raise BlockcacheError(f"plan tensor for {name!r} has shape {tuple(t.shape)}"
                                  f"{' (transposed)' if source.transposed else ''}, the model needs {tuple(meta.shape)}")
        key = (source.tensor, source.transposed)
        if key not in views:
            flat = storage[t.offset: t.offset + t.length].view(stored_dtype)
            value = flat.view(t.shape)
            if source.transposed and uses[source.tensor] == {True} and stored_dtype == dtype:
                flat.copy_(value.t().contiguous().view(-1))  # in place: PyTorch's layout
                value = flat.view(shape)
            elif source.transposed:
                value = value.t()
            if value.dtype != dtype or not value.is_contiguous():
                # one cast (or re-layout) per weight into a tensor of its own, PyTorch's layout
                value = torch.empty(shape, dtype=dtype, device=storage.device).copy_(value)
            views[key] = value
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        module.register_parameter(attr, torch.nn.Parameter(views[key], requires_grad=False))
    del views
    # Buffers are fixed tables a network derives from its config (PixArt's sin-cos positions; none in DiT
    # or U-ViT): made again here, on the storage's device, never left as meta tensors.
    fixed = model.fixed_buffers() if hasattr(model, "fixed_buffers") else {}
    for name, _ in list(model.named_buffers()):
        if name not in fixed:
            raise BlockcacheError(f"the torch backend cannot load buffer {name!r} from a plan")
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        module.register_buffer(attr, fixed[name].to(storage.device), persistent=False)
    # Parameters at the stored precision are views that keep the shared storage alive by
    # themselves; after a cast nothing refers to it any more and it is freed with the caller's reference.
    return model.eval().requires_grad_(False)

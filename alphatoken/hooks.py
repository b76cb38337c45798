"""The thin autograd-hook layer: capture each tracked layer's input `a` and observe its output-gradient `g`.

A forward hook records the input of every tracked module while a capture is open. For the layers whose
output-gradient is wanted, it ties the output `z` to a scalar leaf `p` (a *probe*, see `_Probe`) and registers
a tensor hook on it: `torch.autograd.grad(loss, probes)` then runs a backward that computes input-gradients only
(no weight-gradient GEMMs), stops below the lowest probed layer, and hands each layer's `g` to a callback as
it arrives — the callback computes that layer's values and the full `g` is dropped right after.

With `head_rows`, a pre-hook on the head records its full input (B, T, d) and hands the head only those rows
(as one (1, k, d) sequence): the model's logits are then the head's output at those rows alone, and the rest of
the head is computed by the caller from the captured input (the fused, chunked head).

Forward hooks exist only while a capture is open (one forward pass), so the model carries no hook between
calls, even after an exception, and a forward recomputed by gradient checkpointing during a backward is not
recorded twice. Reentrant checkpointing runs its first forward without autograd, which no
`autograd.grad` can see through; that case raises an error that says what to set.
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .layers import TrackedLayer


class _Probe(torch.autograd.Function):
    """Identity on z, tied in the graph to a scalar leaf p: asking `autograd.grad` for p makes the engine run
    the backward down to z (so z's tensor hook sees g), while the gradient handed to p is None — no reduction
    of g in this or in the training backward. In place (`mark_dirty`): no copy, and no view that a later
    in-place op on z would trip over. Safe for the tracked modules, none of which saves its own output."""

    @staticmethod
    def forward(ctx, z, p):
        ctx.mark_dirty(z)
        return z

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class Capture:
    def __init__(self, layers: list[TrackedLayer]):
        self.layers = layers
        self.recording = False
        self.probe_layers: set[int] = set()
        self.inputs: dict[int, torch.Tensor] = {}
        self.head_output: Optional[torch.Tensor] = None  # layer 0's output, before any probe
        self.head_rows: Optional[torch.Tensor] = None  # rows of the flattened head input the head is given
        self.head_fed = False  # whether the head ran on `head_rows` alone in the last forward
        self.head_ran = False
        self.rows_expected = 0
        self.probes: dict[int, torch.Tensor] = {}
        self.on_grad: Optional[Callable[[int, torch.Tensor], None]] = None
        self.missed: list[str] = []
        self.handles: list = []

    def _forward_hook(self, index: int):
        def hook(module, args, output):
            if not self.recording:
                return None
            ran = self.head_ran if index == 0 else index in self.inputs
            if ran:
                raise ValueError(
                    f"unsupported tracked module {self.layers[index].name!r}: it ran twice in one forward pass "
                    "(a shared module); exclude it with AlphaTokenConfig(tracked_layers=<regex>)"
                )
            if index == 0:
                self.head_ran = True
                self.head_output = output
                if self.head_fed:  # the pre-hook kept the full input; args[0] holds the fed rows
                    return None
            self.inputs[index] = args[0]
            if index not in self.probe_layers:
                return None
            if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
                self.missed.append(self.layers[index].name)
                return None
            probe = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
            probed = _Probe.apply(output, probe)
            probed.register_hook(lambda grad: self._deliver(index, grad))
            self.probes[index] = probe
            return probed

        return hook

    def _head_pre_hook(self, module, args):
        if not self.recording or self.head_rows is None or 0 in self.inputs:
            return None
        x = args[0]
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[:-1].numel() != self.rows_expected:
            return None  # not the (B, T, d) rows of the batch: the head runs as the model asks
        self.inputs[0] = x
        self.head_fed = True
        return (x.reshape(-1, x.shape[-1]).index_select(0, self.head_rows).unsqueeze(0), *args[1:])

    def _deliver(self, index: int, grad: torch.Tensor) -> None:
        if self.on_grad is not None:  # g of W a itself (a scaled or padded embedding's output is not W a)
            self.on_grad(index, self.layers[index].output_gradient(grad, self.inputs[index]))

    def open(self, probe_layers: set[int], head_rows: Optional[torch.Tensor] = None, rows_expected: int = 0) -> None:
        """Attach the forward hooks for one forward pass (they exist only until `close_recording`).

        head_rows: feed the head only these rows of its flattened input when that input has `rows_expected`
        rows (B·T); `head_fed` then says it happened and `inputs[0]` holds the full input.
        """
        self.inputs, self.probes, self.missed = {}, {}, []
        self.probe_layers = set(probe_layers)
        self.head_rows, self.rows_expected, self.head_fed, self.head_ran = head_rows, rows_expected, False, False
        self._detach()
        self.handles = [layer.module.register_forward_hook(self._forward_hook(i)) for i, layer in enumerate(self.layers)]
        if head_rows is not None:
            self.handles.append(self.layers[0].module.register_forward_pre_hook(self._head_pre_hook))
        self.recording = True

    def _detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def close_recording(self) -> None:
        self.recording = False
        self._detach()
        if self.missed:
            raise RuntimeError(
                f"no autograd graph reached tracked layers {self.missed[:3]}{'...' if len(self.missed) > 3 else ''}: "
                "the forward ran without gradients there. With gradient checkpointing, use the non-reentrant form "
                "(use_reentrant=False, the transformers default): model.gradient_checkpointing_enable("
                "gradient_checkpointing_kwargs={'use_reentrant': False}), or activation_checkpointing_enable("
                "activation_checkpointing_kwargs={'use_reentrant': False}) in newer transformers."
            )

    def backward(self, output: torch.Tensor, on_grad: Callable[[int, torch.Tensor], None], retain_graph: bool,
                 grad_output: Optional[torch.Tensor] = None) -> None:
        """Run the valuation backward from `output` (a loss, or a tensor with its `grad_output`) towards the
        probes; `on_grad(layer_index, g)` sees each layer's g."""
        indices = sorted(self.probes)
        if not indices:
            return
        # autograd may call the hooks on a worker thread, whose context is empty: run them in a copy of this
        # one (kernel overrides and launch counters are contextvars, alphatoken.kernels.gate)
        context = contextvars.copy_context()
        self.on_grad = lambda index, grad: context.copy().run(on_grad, index, grad)
        try:
            torch.autograd.grad(
                output, [self.probes[i] for i in indices], grad_outputs=grad_output, retain_graph=retain_graph,
                allow_unused=True,
            )
        finally:
            self.on_grad = None

    def release(self) -> None:
        self.inputs, self.probes, self.head_output = {}, {}, None

    def remove(self) -> None:
        self.recording = False
        self._detach()
        self.release()

    def session(self, probe_layers: set[int], rows_expected: int, head_rows: Optional[torch.Tensor] = None
                ) -> "CaptureSession":
        """One pass of the capture protocol over a batch of `rows_expected` (B·T) positions (`CaptureSession`)."""
        return CaptureSession(self, probe_layers, rows_expected, head_rows)


@dataclass
class LayerRows:
    """What the valuation backward hands over for one tracked layer: its input rows `a` and output-gradient rows
    `g` at the rows asked for, and the full flattened (B·T, ·) `a_all`, `g_all` (an embedding's `a` holds token
    ids). Valid only inside the callback: `g_all` is dropped right after."""

    index: int
    layer: TrackedLayer
    a: torch.Tensor
    g: torch.Tensor
    a_all: torch.Tensor
    g_all: torch.Tensor


class CaptureSession:
    """Capture → forward → valuation backward → per-layer rows, for one batch: the one copy of the protocol that
    the valuer, the validation target and the Fisher estimate share (DESIGN §5.1).

        with capture.session(probe_layers, B * T) as session:
            logits = session.forward(model, inputs)
            session.backward(loss, on_rows, head_rows=rows.head, body_rows=rows.tokens, retain_graph=False)

    `on_rows(LayerRows)` is called under `torch.no_grad()` as each probed layer's g arrives: at the head with
    `head_rows`, at every other layer with `body_rows` (rows of the flattened batch). Leaving the block releases
    the captured tensors.
    """

    def __init__(self, capture: Capture, probe_layers: set[int], rows_expected: int,
                 head_rows: Optional[torch.Tensor] = None):
        self.capture = capture
        self.probe_layers = set(probe_layers)
        self.rows_expected = rows_expected
        self.head_rows = head_rows

    def __enter__(self) -> "CaptureSession":
        return self

    def __exit__(self, *exc) -> None:
        self.capture.release()

    def forward(self, model, inputs: dict):
        """Run `model(**inputs)` with the hooks attached (under enable_grad: the valuation backward needs the
        graph) and return its logits."""
        self.capture.open(self.probe_layers, head_rows=self.head_rows, rows_expected=self.rows_expected)
        try:
            with torch.enable_grad():
                return model(**inputs).logits
        finally:
            self.capture.close_recording()

    def backward(self, output: torch.Tensor, on_rows: Callable[[LayerRows], None], head_rows: torch.Tensor,
                 body_rows: torch.Tensor, retain_graph: bool, grad_output: Optional[torch.Tensor] = None) -> None:
        """The valuation backward from `output` (a loss, or a tensor with its `grad_output`) towards the probes."""
        capture = self.capture

        @torch.no_grad()
        def on_grad(index: int, grad: torch.Tensor) -> None:
            layer = capture.layers[index]
            x = capture.inputs[index]
            a_all = x.reshape(-1) if layer.kind == "embedding" else x.reshape(-1, x.shape[-1])
            g_all = grad.reshape(-1, grad.shape[-1])
            if a_all.shape[0] != g_all.shape[0] or g_all.shape[0] != self.rows_expected:
                raise ValueError(
                    f"unsupported tracked module {layer.name!r}: its rows ({a_all.shape[0]}) do not map to the "
                    f"batch's (B, T) positions; exclude it with AlphaTokenConfig(tracked_layers=<regex>)"
                )
            rows = head_rows if layer.is_head else body_rows
            on_rows(LayerRows(index, layer, a_all.index_select(0, rows), g_all.index_select(0, rows), a_all, g_all))

        capture.backward(output, on_grad, retain_graph=retain_graph, grad_output=grad_output)

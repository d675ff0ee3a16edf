"""Recurrent layers (RNN, GRU, LSTM) built from hookable linear maps, for DP-SGD.

``torch.nn.RNN``/``GRU``/``LSTM`` run in one fused kernel whose weights the per-sample-gradient
hooks cannot see. Here every weight lives in an ``RNNLinear`` (an ``nn.Linear`` whose batch is
always on dim 0): the input-to-hidden map ``ih`` is applied once per layer to the whole
``(batch, time, features)`` sequence, the hidden-to-hidden map ``hh`` (and the LSTM projection
``hr``) once per time step; the hooks add up the per-step contributions.

Variable-length (``PackedSequence``) batches run on the padded tensor in the original batch
order; past its end a sequence's state is carried unchanged (the step's result is dropped, so it
gets no gradient). Per-sample gradients thus stay indexed like the batch the user passed, which
the other layers of the model and the per-sample clipping rely on.

Cell equations are those documented for ``torch.nn.RNNCell``, ``GRUCell`` and ``LSTMCell``
(Cho et al. 2014; Hochreiter & Schmidhuber 1997; projections: Sak et al. 2014).
"""

import math
from typing import List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from opacus.layers.param_rename import RenameParamsMixin
from opacus.utils.packed_sequences import compute_seq_lengths

__all__ = [
    "DPGRU",
    "DPGRUCell",
    "DPLSTM",
    "DPLSTMCell",
    "DPLSTMProjectionCell",
    "DPRNN",
    "DPRNNBase",
    "DPRNNCell",
    "DPRNNCellBase",
    "RNNLinear",
    "apply_permutation",
    "compute_seq_lengths",
]

State = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def apply_permutation(tensor: torch.Tensor, dim: int, permutation: Optional[torch.Tensor]):
    """``tensor`` reordered along ``dim`` by ``permutation`` (unchanged when it is ``None``).

    Args:
        tensor: the tensor to reorder.
        dim: the dimension to reorder.
        permutation: the new order of the indices (None: unchanged).
    """
    if permutation is None:
        return tensor
    return tensor.index_select(dim, permutation)


class RNNLinear(nn.Linear):
    """``nn.Linear`` used inside the DP recurrent layers; its batch is always on dim 0.

    It is applied at every time step on ``(batch, features)`` tensors (or once on
    ``(batch, time, features)``), whatever layout the recurrent layer's user chose, hence
    ``_batch_dim_always_first`` (read by the per-sample-gradient hooks).

    Args:
        in_features: input size.
        out_features: output size.
        bias: whether there is a bias.
    """

    _batch_dim_always_first = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        self.max_batch_len = 0


class DPRNNCellBase(nn.Module):
    """A recurrent cell: ``ih`` (input to ``num_chunks`` gates) and ``hh`` (hidden to gates).

    Args:
        input_size: the number of features of each input step.
        hidden_size: the number of features of the hidden state.
        bias: whether the linear maps have biases.
        num_chunks: the number of gates (the linear maps output ``num_chunks * hidden_size``).
    """

    has_cell_state = False

    def __init__(self, input_size: int, hidden_size: int, bias: bool, num_chunks: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.ih = RNNLinear(input_size, num_chunks * hidden_size, bias)
        self.hh = RNNLinear(hidden_size, num_chunks * hidden_size, bias)
        self.reset_parameters()

    @property
    def output_size(self) -> int:
        """Size of the hidden state ``h`` the cell outputs (``hidden_size``)."""
        return self.hidden_size

    def reset_parameters(self) -> None:
        """Uniform(-1/sqrt(hidden_size), 1/sqrt(hidden_size)), as torch's recurrent layers."""
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def set_max_batch_length(self, max_batch_length: int) -> None:
        """Record the full batch size on the cell's linear maps (for the hooks' bookkeeping).

        Args:
            max_batch_length: the batch size of the whole sequence.
        """
        for module in self.modules():
            if isinstance(module, RNNLinear):
                module.max_batch_len = max_batch_length

    def zero_state(self, batch_size: int, reference: torch.Tensor):
        """All-zero initial state ``(batch_size, output_size)``, dtype/device of ``reference``."""
        h = reference.new_zeros(batch_size, self.output_size)
        return h

    def step(self, input_gates: torch.Tensor, hx):
        """One time step given ``ih(x_t)``; returns the new state (``(h, c)`` for LSTM)."""
        raise NotImplementedError

    def _forward(self, input, hx, batch_size_t):
        if input.dim() != 2:
            raise ValueError(
                f"{type(self).__name__} expects a (batch, input_size) input, got shape "
                f"{tuple(input.shape)}"
            )
        if hx is None:
            hx = self.zero_state(input.shape[0], input)
        elif batch_size_t is not None:
            # Packed sequences: only the first batch_size_t sequences are still running.
            hx = tuple(h[:batch_size_t] for h in hx) if isinstance(hx, tuple) else hx[:batch_size_t]
        return self.step(self.ih(input), hx)


class DPRNNCell(DPRNNCellBase):
    """Elman cell ``h' = act(W_ih x + b_ih + W_hh h + b_hh)`` with ``act`` tanh or relu.

    Args:
        input_size: the number of features of each input step.
        hidden_size: the number of features of the hidden state.
        bias: whether the linear maps have biases.
        nonlinearity: ``"tanh"`` or ``"relu"``.

    Raises:
        ValueError: ``nonlinearity`` is neither.
    """

    def __init__(
        self, input_size: int, hidden_size: int, bias: bool, nonlinearity: str = "tanh"
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(
                f"DPRNNCell: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}"
            )
        super().__init__(input_size, hidden_size, bias, num_chunks=1)
        self.nonlinearity = nonlinearity

    def step(self, input_gates, hx):
        """``act(input_gates + hh(hx))``: the new hidden state ``(batch, hidden_size)``.

        ``input_gates`` is ``ih(x_t)`` of shape ``(batch, hidden_size)``; ``hx`` is ``h_{t-1}``.
        """
        pre = input_gates + self.hh(hx)
        return torch.tanh(pre) if self.nonlinearity == "tanh" else torch.relu(pre)

    def forward(
        self,
        input: torch.Tensor,
        hx: Optional[torch.Tensor] = None,
        batch_size_t: Optional[int] = None,
    ) -> torch.Tensor:
        """One time step, like ``torch.nn.RNNCell``.

        Args:
            input: ``(batch, input_size)`` input ``x_t``.
            hx: ``(batch, hidden_size)`` previous state; zeros when ``None``.
            batch_size_t: For packed sequences, the number of sequences still running at this
                step: only the first ``batch_size_t`` rows of ``hx`` are used.

        Returns:
            The new hidden state, ``(batch, hidden_size)``.
        """
        return self._forward(input, hx, batch_size_t)


class DPGRUCell(DPRNNCellBase):
    """GRU cell (gate order r, z, n as in ``torch.nn.GRUCell``).

    Args:
        input_size: the number of features of each input step.
        hidden_size: the number of features of the hidden state.
        bias: whether the linear maps have biases.
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=3)

    def step(self, input_gates, hx):
        """GRU update from ``input_gates = ih(x_t)`` ``(batch, 3 * hidden_size)`` and ``hx``.

        ``r = sigmoid(x_r + h_r)``, ``z = sigmoid(x_z + h_z)``, ``n = tanh(x_n + r * h_n)`` with
        ``(h_r, h_z, h_n) = hh(hx)``; returns ``(1 - z) * n + z * hx``, ``(batch, hidden_size)``.
        """
        x_r, x_z, x_n = input_gates.chunk(3, dim=1)
        h_r, h_z, h_n = self.hh(hx).chunk(3, dim=1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return (1 - z) * n + z * hx

    def forward(
        self,
        input: torch.Tensor,
        hx: Optional[torch.Tensor] = None,
        batch_size_t: Optional[int] = None,
    ) -> torch.Tensor:
        """One time step, like ``torch.nn.GRUCell``.

        Args:
            input: ``(batch, input_size)`` input ``x_t``.
            hx: ``(batch, hidden_size)`` previous state; zeros when ``None``.
            batch_size_t: For packed sequences, the number of sequences still running at this
                step: only the first ``batch_size_t`` rows of ``hx`` are used.

        Returns:
            The new hidden state, ``(batch, hidden_size)``.
        """
        return self._forward(input, hx, batch_size_t)


class DPLSTMCell(DPRNNCellBase):
    """LSTM cell (gate order i, f, g, o as in ``torch.nn.LSTMCell``).

    Args:
        input_size: the number of features of each input step.
        hidden_size: the number of features of the hidden state.
        bias: whether the linear maps have biases.
    """

    has_cell_state = True
    proj_size = 0

    def __init__(self, input_size: int, hidden_size: int, bias: bool) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=4)

    @property
    def output_size(self) -> int:
        """Size of the output ``h``: ``proj_size`` when projecting, else ``hidden_size``."""
        return self.proj_size if self.proj_size > 0 else self.hidden_size

    def zero_state(self, batch_size: int, reference: torch.Tensor):
        """Zero ``(h, c)``: ``(batch_size, output_size)`` and ``(batch_size, hidden_size)``."""
        return (
            reference.new_zeros(batch_size, self.output_size),
            reference.new_zeros(batch_size, self.hidden_size),
        )

    def step(self, input_gates, hx):
        """LSTM update from ``input_gates = ih(x_t)`` ``(batch, 4 * hidden_size)`` and ``(h, c)``.

        ``c' = sigmoid(f) * c + sigmoid(i) * tanh(g)``, ``h' = sigmoid(o) * tanh(c')`` (then
        ``h' = hr(h')`` when ``proj_size > 0``), with gates ``i, f, g, o`` of
        ``input_gates + hh(h)``. Returns ``(h', c')``.
        """
        h, c = hx
        gates = input_gates + self.hh(h)
        i, f, g, o = gates.chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if self.proj_size > 0:
            h_new = self.hr(h_new)
        return h_new, c_new

    def forward(
        self,
        input: torch.Tensor,
        hx: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        batch_size_t: Optional[int] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """One time step, like ``torch.nn.LSTMCell``.

        Args:
            input: ``(batch, input_size)`` input ``x_t``.
            hx: ``(h, c)`` of shapes ``(batch, output_size)`` and ``(batch, hidden_size)``;
                zeros when ``None``.
            batch_size_t: For packed sequences, the number of sequences still running at this
                step: only the first ``batch_size_t`` rows of ``h`` and ``c`` are used.

        Returns:
            The new ``(h, c)``.
        """
        return self._forward(input, hx, batch_size_t)


class DPLSTMProjectionCell(DPLSTMCell):
    """LSTM cell whose output ``h`` is projected to ``proj_size`` by ``hr`` (as in ``nn.LSTM``).

    The recurrent map ``hh`` then reads the projected state (Sak et al. 2014).
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool, proj_size: int) -> None:
        if not 0 < proj_size < hidden_size:
            raise ValueError(
                f"DPLSTMProjectionCell: proj_size ({proj_size}) must be in (0, hidden_size="
                f"{hidden_size})"
            )
        super().__init__(input_size, hidden_size, bias)
        self.proj_size = proj_size
        self.hh = RNNLinear(proj_size, 4 * hidden_size, bias)
        self.hr = RNNLinear(hidden_size, proj_size, bias=False)
        self.reset_parameters()


_MODES = {
    "RNN_TANH": (DPRNNCell, {"nonlinearity": "tanh"}),
    "RNN_RELU": (DPRNNCell, {"nonlinearity": "relu"}),
    "GRU": (DPGRUCell, {}),
    "LSTM": (DPLSTMCell, {}),
}


class DPRNNBase(RenameParamsMixin, nn.Module):
    """Multi-layer, optionally bidirectional recurrent layer made of DP cells.

    Same inputs and outputs as the corresponding ``torch.nn`` layer: ``(L, N, H_in)`` (or
    ``(N, L, H_in)`` with ``batch_first``), unbatched ``(L, H_in)``, or a ``PackedSequence``;
    returns ``(output, h_n)`` (``(output, (h_n, c_n))`` for LSTM). Parameters of layer ``k``
    live in ``l{k}`` (``l{k}_reverse`` backwards), which ``named_parameters()`` reports.
    ``state_dict()`` has exactly the keys, shapes and order of the ``torch.nn`` layer
    (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``, ``weight_hr_l0``...,
    gate order as in torch), also when nested in a bigger model; ``load_state_dict`` accepts
    those names and the internal ones, and torch's names resolve as attributes.

    Args:
        mode: ``"RNN_TANH"``, ``"RNN_RELU"``, ``"GRU"``, ``"LSTM"`` or a cell class.
        input_size: the number of features of each input step.
        hidden_size: the number of features of the hidden state.
        num_layers: the number of stacked recurrent layers.
        bias: whether the linear maps have biases.
        batch_first: True if inputs and outputs are ``(batch, seq, feature)``, False for ``(seq,
            batch, feature)``.
        dropout: dropout probability on the outputs of every layer except the last.
        bidirectional: run a second, reversed direction in every layer.
        proj_size: project the hidden state to this size (0: no projection).
        cell_params: extra keyword arguments for every cell.

    Raises:
        ValueError: an unknown ``mode``, or ``num_layers``, ``dropout`` or ``proj_size`` out of
            range.
    """

    def __init__(
        self,
        mode: Union[str, Type[DPRNNCellBase]],
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        cell_params: Optional[dict] = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if isinstance(mode, str):
            if mode not in _MODES:
                raise ValueError(f"{name}: unknown mode {mode!r}; use one of {sorted(_MODES)}")
            cell_type, default_params = _MODES[mode]
        else:
            cell_type, default_params = mode, {}
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"{name}: num_layers must be a positive int, got {num_layers!r}")
        if not 0 <= dropout <= 1 or isinstance(dropout, bool):
            raise ValueError(f"{name}: dropout must be a number in [0, 1], got {dropout!r}")
        if proj_size < 0:
            raise ValueError(f"{name}: proj_size must be >= 0, got {proj_size}")
        if proj_size > 0:
            if not issubclass(cell_type, DPLSTMCell):
                raise ValueError(f"{name}: proj_size is only supported for LSTM, not RNN or GRU")
            if proj_size >= hidden_size:
                raise ValueError(
                    f"{name}: proj_size ({proj_size}) has to be smaller than hidden_size "
                    f"({hidden_size})"
                )
        self.mode = mode
        self.cell_type = cell_type
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.num_directions = 2 if bidirectional else 1
        self.proj_size = proj_size
        self.cell_params = {**default_params, **(cell_params or {})}
        if proj_size > 0:
            self.cell_type = DPLSTMProjectionCell
            self.cell_params["proj_size"] = proj_size
        self.cells = self.initialize_cells()

    @property
    def output_size(self) -> int:
        """Per-direction size of ``output`` and ``h_n``: ``proj_size`` or else ``hidden_size``."""
        return self.proj_size if self.proj_size > 0 else self.hidden_size

    def initialize_cells(self):
        """Create the cells ``l{k}`` / ``l{k}_reverse`` and the torch-name rename map."""
        cells, rename_map = [], {}
        for layer in range(self.num_layers):
            in_size = self.input_size if layer == 0 else self.output_size * self.num_directions
            for direction in range(self.num_directions):
                suffix = "_reverse" if direction == 1 else ""
                cell_name = f"l{layer}{suffix}"
                cell = self.cell_type(in_size, self.hidden_size, self.bias, **self.cell_params)
                setattr(self, cell_name, cell)
                cells.append(cell)
                # torch.nn's order: weight_ih, weight_hh, bias_ih, bias_hh, weight_hr.
                for kind in ("ih", "hh"):
                    rename_map[f"weight_{kind}_l{layer}{suffix}"] = f"{cell_name}.{kind}.weight"
                if self.bias:
                    for kind in ("ih", "hh"):
                        rename_map[f"bias_{kind}_l{layer}{suffix}"] = f"{cell_name}.{kind}.bias"
                if self.proj_size > 0:
                    rename_map[f"weight_hr_l{layer}{suffix}"] = f"{cell_name}.hr.weight"
        self.set_rename_map(rename_map)
        return cells

    def iterate_layers(self, *args):
        """Yield ``(cells of layer k, *(arg[k * D : (k + 1) * D] for arg in args))``.

        Each ``arg`` is stacked over (layer, direction) on dim 0, like ``h_0``; ``None`` stays
        ``None``.
        """
        d = self.num_directions
        for layer in range(self.num_layers):
            cells = self.cells[layer * d : (layer + 1) * d]
            yield (cells, *(None if a is None else a[layer * d : (layer + 1) * d] for a in args))

    def forward(
        self,
        input: Union[torch.Tensor, PackedSequence],
        state_init: Optional[State] = None,
    ) -> Tuple[Union[torch.Tensor, PackedSequence], State]:
        """Run the whole sequence through every layer and direction, like ``torch.nn.RNN/GRU/LSTM``.

        Args:
            input: ``(L, N, H_in)`` (``(N, L, H_in)`` with ``batch_first``), unbatched
                ``(L, H_in)``, or a ``PackedSequence``.
            state_init: Initial state ``h_0`` of shape ``(num_layers * D, N, H_out)``, or
                ``(h_0, c_0)`` for LSTM with ``c_0`` of shape ``(num_layers * D, N, hidden_size)``
                (``D`` = 2 if bidirectional else 1; no ``N`` dim for unbatched input). Zeros
                when ``None``. The batch is on dim 1 here whatever ``batch_first`` is.

        Returns:
            ``(output, h_n)``, or ``(output, (h_n, c_n))`` for LSTM. ``output`` has the layout of
            ``input`` with last dim ``D * H_out`` (a ``PackedSequence`` for packed input);
            ``h_n``/``c_n`` have the shapes of ``h_0``/``c_0``.

        Example:
            >>> lstm = DPLSTM(input_size=3, hidden_size=5, batch_first=True)
            >>> out, (h_n, c_n) = lstm(torch.randn(2, 7, 3))
            >>> out.shape, h_n.shape
            (torch.Size([2, 7, 5]), torch.Size([1, 2, 5]))
        """
        is_packed = isinstance(input, PackedSequence)
        if is_packed:
            # pad_packed_sequence restores the caller's batch order (unsorted_indices).
            x, lengths = pad_packed_sequence(input, batch_first=False)
            is_batched = True
        else:
            is_batched = self._check_input(input)
            x = input if is_batched else input.unsqueeze(0 if self.batch_first else 1)
            if self.batch_first:
                x = x.transpose(0, 1)
            lengths = None
        seq_length, batch_size = x.shape[0], x.shape[1]
        h_0, c_0 = self._initial_state(state_init, batch_size, x, is_batched)

        layer_input = x
        h_n, c_n = [], []
        for layer, (cells, h0s, c0s) in enumerate(self.iterate_layers(h_0, c_0)):
            outputs = []
            for direction, cell in enumerate(cells):
                cell.set_max_batch_length(batch_size)
                out, h, c = self.forward_layer(
                    layer_input,
                    h0s[direction],
                    None if c0s is None else c0s[direction],
                    lengths,
                    cell,
                    batch_size,
                    seq_length,
                    is_packed,
                    reverse_layer=direction == 1,
                )
                outputs.append(out)
                h_n.append(h)
                c_n.append(c)
            layer_input = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, p=self.dropout, training=True)

        output = layer_input
        h_n = torch.stack(h_n)
        c_n = torch.stack(c_n) if self.cell_type.has_cell_state else None
        if is_packed:
            output = _repack_like(output, lengths, input)
        else:
            if self.batch_first:
                output = output.transpose(0, 1)
            if not is_batched:
                output = output.squeeze(0 if self.batch_first else 1)
                h_n = h_n.squeeze(1)
                c_n = None if c_n is None else c_n.squeeze(1)
        return output, ((h_n, c_n) if c_n is not None else h_n)

    def forward_layer(
        self,
        x: Union[torch.Tensor, PackedSequence],
        h_0: torch.Tensor,
        c_0: Optional[torch.Tensor],
        batch_sizes: Optional[torch.Tensor],
        cell: DPRNNCellBase,
        max_batch_size: int,
        seq_length: int,
        is_packed: bool,
        reverse_layer: bool,
    ) -> Tuple[Union[torch.Tensor, List[torch.Tensor]], torch.Tensor, torch.Tensor]:
        """Run one direction of one layer over time-major ``x`` ``(T, N, *)``.

        ``max_batch_size`` is N and ``seq_length`` T. ``batch_sizes`` is, for packed input
        (``is_packed``), the length of each sequence in ``x``'s batch order (``None``
        otherwise): steps past a sequence's end leave its state unchanged. ``reverse_layer``
        runs from the last step to the first (each sequence starts at its own end).
        Returns the ``(T, N, H_out)`` outputs (zero past each end) and the final ``h`` and ``c``.

        Args:
            x: the layer input, time-major ``(T, N, *)``.
            h_0: the initial hidden state ``(N, H_out)``.
            c_0: the initial cell state (LSTM only, else None).
            batch_sizes: for packed input, each sequence's length; None otherwise.
            cell: the cell of this layer and direction.
            max_batch_size: N.
            seq_length: T.
            is_packed: whether the input came from a ``PackedSequence``.
            reverse_layer: run from the last step to the first.

        Returns:
            ``(outputs, h, c)``: the outputs ``(T, N, H_out)`` and the final states.
        """
        # One call of ih for all steps, batch on dim 0: (N, T, H_in) -> (N, T, gates).
        input_gates = cell.ih(x.transpose(0, 1))
        state = (h_0, c_0) if cell.has_cell_state else h_0
        valid = None
        if is_packed:
            steps = torch.arange(seq_length, device=x.device).unsqueeze(1)
            valid = (steps < batch_sizes.to(x.device).unsqueeze(0)).unsqueeze(2)  # (T, N, 1)
        outputs = [None] * seq_length
        order = range(seq_length - 1, -1, -1) if reverse_layer else range(seq_length)
        for t in order:
            new_state = cell.step(input_gates[:, t], state)
            if valid is not None:
                keep = valid[t]
                if cell.has_cell_state:
                    new_state = tuple(torch.where(keep, n, s) for n, s in zip(new_state, state))
                else:
                    new_state = torch.where(keep, new_state, state)
            state = new_state
            h = state[0] if cell.has_cell_state else state
            outputs[t] = h if valid is None else h * keep
        h_n, c_n = state if cell.has_cell_state else (state, None)
        return torch.stack(outputs), h_n, c_n

    def _check_input(self, input: torch.Tensor) -> bool:
        name = type(self).__name__
        if input.dim() not in (2, 3):
            layout = "(N, L, H_in)" if self.batch_first else "(L, N, H_in)"
            raise ValueError(
                f"{name}: input must be 3-D {layout}, 2-D (unbatched) or a PackedSequence; "
                f"got shape {tuple(input.shape)}"
            )
        if input.shape[-1] != self.input_size:
            raise ValueError(
                f"{name}: input.size(-1) must equal input_size={self.input_size}, "
                f"got {input.shape[-1]}"
            )
        return input.dim() == 3

    def _initial_state(self, state_init, batch_size, x, is_batched):
        """``(h_0, c_0)`` stacked over (layer, direction): ``(L * D, N, *)``; c_0 None if unused."""
        name = type(self).__name__
        n_states = self.num_layers * self.num_directions
        has_c = self.cell_type.has_cell_state
        if state_init is None:
            h_0 = x.new_zeros(n_states, batch_size, self.output_size)
            c_0 = x.new_zeros(n_states, batch_size, self.hidden_size) if has_c else None
            return h_0, c_0
        if has_c:
            if not (isinstance(state_init, (tuple, list)) and len(state_init) == 2):
                raise ValueError(f"{name}: state_init must be a tuple (h_0, c_0)")
            h_0, c_0 = state_init
        else:
            if isinstance(state_init, (tuple, list)):
                raise ValueError(f"{name}: state_init must be a tensor h_0, not a tuple")
            h_0, c_0 = state_init, None
        if not is_batched:
            h_0 = h_0.unsqueeze(1)
            c_0 = None if c_0 is None else c_0.unsqueeze(1)
        expected = {
            "h_0": (n_states, batch_size, self.output_size),
            "c_0": (n_states, batch_size, self.hidden_size),
        }
        for key, tensor in (("h_0", h_0), ("c_0", c_0)):
            if tensor is not None and tuple(tensor.shape) != expected[key]:
                raise ValueError(
                    f"{name}: {key} has shape {tuple(tensor.shape)}, expected "
                    f"(num_layers * num_directions, N, size) = {expected[key]} "
                    "(the batch is on dim 1 of initial states whatever batch_first is)"
                )
        return h_0, c_0


def _repack_like(output: torch.Tensor, lengths: torch.Tensor, like: PackedSequence):
    """Pack time-major ``output`` (original batch order) with ``like``'s layout and permutation."""
    sorted_indices = like.sorted_indices
    data = pack_padded_sequence(
        apply_permutation(output, 1, sorted_indices),
        apply_permutation(lengths, 0, None if sorted_indices is None else sorted_indices.cpu()),
        enforce_sorted=True,
    ).data
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


class DPRNN(DPRNNBase):
    """DP version of ``torch.nn.RNN`` (Elman RNN, tanh or relu).

    Args:
        input_size: the number of features of each input step.
        hidden_size: the number of features of the hidden state.
        num_layers: the number of stacked recurrent layers.
        bias: whether the linear maps have biases.
        batch_first: True if inputs and outputs are ``(batch, seq, feature)``, False for ``(seq,
            batch, feature)``.
        dropout: dropout probability on the outputs of every layer except the last.
        bidirectional: run a second, reversed direction in every layer.
        proj_size: project the hidden state to this size (0: no projection).
        nonlinearity: ``"tanh"`` or ``"relu"``.

    Raises:
        ValueError: an argument is out of range.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0,
        bidirectional: bool = False,
        proj_size: int = 0,
        nonlinearity: str = "tanh",
    ) -> None:
        if proj_size:
            raise ValueError("DPRNN: proj_size is only supported for LSTM, not RNN or GRU")
        super().__init__(
            DPRNNCell,
            input_size,
            hidden_size,
            num_layers=num_layers,
            bias=bias,
            batch_first=batch_first,
            dropout=dropout,
            bidirectional=bidirectional,
            cell_params={"nonlinearity": nonlinearity},
        )
        self.nonlinearity = nonlinearity


class DPGRU(DPRNNBase):
    """DP version of ``torch.nn.GRU``.

    Args:
        input_size: the number of features of each input step.
        hidden_size: the number of features of the hidden state.
        num_layers: the number of stacked recurrent layers.
        bias: whether the linear maps have biases.
        batch_first: True if inputs and outputs are ``(batch, seq, feature)``, False for ``(seq,
            batch, feature)``.
        dropout: dropout probability on the outputs of every layer except the last.
        bidirectional: run a second, reversed direction in every layer.
        proj_size: project the hidden state to this size (0: no projection).

    Raises:
        ValueError: an argument is out of range.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0,
        bidirectional: bool = False,
        proj_size: int = 0,
    ) -> None:
        if proj_size:
            raise ValueError("DPGRU: proj_size is only supported for LSTM, not RNN or GRU")
        super().__init__(
            DPGRUCell,
            input_size,
            hidden_size,
            num_layers=num_layers,
            bias=bias,
            batch_first=batch_first,
            dropout=dropout,
            bidirectional=bidirectional,
        )


class DPLSTM(DPRNNBase):
    """DP version of ``torch.nn.LSTM`` (``proj_size`` supported).

    Args:
        input_size: the number of features of each input step.
        hidden_size: the number of features of the hidden state.
        num_layers: the number of stacked recurrent layers.
        bias: whether the linear maps have biases.
        batch_first: True if inputs and outputs are ``(batch, seq, feature)``, False for ``(seq,
            batch, feature)``.
        dropout: dropout probability on the outputs of every layer except the last.
        bidirectional: run a second, reversed direction in every layer.
        proj_size: project the hidden state to this size (0: no projection).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0,
        bidirectional: bool = False,
        proj_size: int = 0,
    ) -> None:
        super().__init__(
            DPLSTMCell,
            input_size,
            hidden_size,
            num_layers=num_layers,
            bias=bias,
            batch_first=batch_first,
            dropout=dropout,
            bidirectional=bidirectional,
            proj_size=proj_size,
        )

"""Deployment: a model as an ONNX file or a ``torch.export`` program, with a dynamic batch axis.

The keep rate is fixed in the exported graph. EViT keeps ``ceil(keep_rate * n)`` tokens, where
``n`` comes from the static image size: while tracing these are plain Python integers, so every
token count is a constant of the graph and only the batch axis is symbolic. Another keep rate
needs another export. Models are exported in eval mode (no keep-rate warm-up, no MixToken).
"""
import contextlib
import importlib
import os
import tempfile
from typing import Callable, Dict, Iterator, Optional

import torch

from .files import Writer

__all__ = ['FORMATS', 'QUANTIZATIONS', 'INPUT_NAME', 'OUTPUT_NAME', 'BATCH_AXIS',
           'example_images', 'export_program', 'onnx_program', 'onnx_bytes', 'quantized_onnx', 'check_exportable',
           'exported_writer', 'require_exporter', 'require_quantizer', 'require_onnxruntime', 'onnxruntime_session',
           'onnxruntime_forward']

FORMATS: Dict[str, str] = {'onnx': '.onnx', 'export': '.pt2'}   # --format -> the file name's usual suffix
# --quantize: onnxruntime's dynamic quantization (weights int8, activations quantized per batch at run time)
QUANTIZATIONS = ('int8',)
INPUT_NAME, OUTPUT_NAME, BATCH_AXIS = 'images', 'logits', 'batch'
# torch.export specialises a dimension of size 1 to the constant 1: trace with 2 images.
_EXAMPLE_BATCH = 2
# One ONNX file is one protobuf message, which cannot exceed 2 GiB.
_ONNX_MAX_BYTES = 2 ** 31
_DEPLOY_EXTRA = "pip install 'timm-evit[deploy]'"


def _import(module: str, purpose: str):
    """``module``, or a ValueError saying what needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f'{purpose} needs {module}: {_DEPLOY_EXTRA}') from e


def require_exporter(format: str, purpose: Optional[str] = None) -> None:
    """A ValueError naming ``--format`` and what is allowed, or the package it is missing, named as
    what ``purpose`` (the option that exports: default ``--format FORMAT``) needs."""
    if format not in FORMATS:
        raise ValueError(f'--format takes one of {", ".join(FORMATS)}, got {format!r}')
    if format == 'onnx':
        for module in ('onnx', 'onnxscript'):   # torch's dynamo ONNX exporter imports both
            _import(module, purpose or '--format onnx')


def require_quantizer(quantize: Optional[str], format: str = 'onnx') -> None:
    """A ValueError naming ``--quantize`` where it cannot be served: another value than ``int8``,
    another format than ONNX, or onnxruntime's quantization module missing."""
    if quantize is None:
        return
    if quantize not in QUANTIZATIONS:
        raise ValueError(f'--quantize takes one of {", ".join(QUANTIZATIONS)}, got {quantize!r}')
    if format != 'onnx':
        raise ValueError(f"--quantize {quantize} quantizes an ONNX file with onnxruntime: use --format onnx, "
                         f"not --format {format}")
    require_exporter('onnx')
    _import('onnxruntime.quantization', f'--quantize {quantize}')


@contextlib.contextmanager
def _in_eval(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode for the duration, its own mode restored afterwards."""
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)


def example_images(model: torch.nn.Module, batch_size: int = _EXAMPLE_BATCH) -> torch.Tensor:
    """Random images of the size the model was built for, on its device and in its dtype."""
    weight = next(model.parameters())
    return torch.randn(batch_size, model.in_chans, *model.patch_embed.img_size, device=weight.device,
                       dtype=weight.dtype)


def _batch_dynamic() -> tuple:
    return ({0: torch.export.Dim(BATCH_AXIS, min=1)},)


def export_program(model: torch.nn.Module) -> torch.export.ExportedProgram:
    """``model`` (eval mode) as a ``torch.export`` program taking ``[batch, C, H, W]`` images."""
    with _in_eval(model):
        return torch.export.export(model, (example_images(model),), dynamic_shapes=_batch_dynamic())


def onnx_program(model: torch.nn.Module) -> 'torch.onnx.ONNXProgram':
    """``model`` (eval mode) exported by torch's dynamo ONNX exporter: input ``images``
    ``[batch, C, H, W]``, output ``logits`` ``[batch, classes]``; the EViT settings are in the
    file's metadata, since they are fixed in its graph."""
    require_exporter('onnx')
    with _in_eval(model):
        program = torch.onnx.export(
            model, (example_images(model),), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: BATCH_AXIS},), verbose=False)
    program.model.metadata_props.update(_evit_metadata(model))
    return program


def _evit_metadata(model: torch.nn.Module) -> Dict[str, str]:
    if not hasattr(model, 'reorg_layers'):
        return {}
    return {'timm_evit.keep_rate': repr(tuple(model.keep_rate)), 'timm_evit.reorg_layers': repr(model.reorg_layers),
            'timm_evit.fuse_token': repr(model.fuse_token), 'timm_evit.fusion': repr(model.fusion),
            'timm_evit.score': repr(model.score)}


def _parameter_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def check_exportable(model: torch.nn.Module, format: str) -> None:
    """A ValueError, before the export, where ``format`` cannot hold ``model`` or is not installed."""
    require_exporter(format)
    size = _parameter_bytes(model)
    if format == 'onnx' and size >= _ONNX_MAX_BYTES:
        raise ValueError(f'--format onnx writes one file, which holds at most 2 GiB of weights; this model has '
                         f'{size / 2 ** 30:.1f} GiB: use --format export')


def onnx_bytes(model: torch.nn.Module) -> bytes:
    """The ONNX file of ``model`` (see ``onnx_program``), weights included."""
    check_exportable(model, 'onnx')
    return onnx_program(model).model_proto.SerializeToString()


def quantized_onnx(data: bytes) -> bytes:
    """An ONNX file quantized by onnxruntime's dynamic quantization, after the pre-processing its
    documentation recommends (``quant_pre_process``: shape inference and graph optimisation):
    MatMul and Gemm weights int8, their activations quantized per batch at run time (no
    calibration data). The file's metadata is kept, with ``timm_evit.quantize`` added.

    ONNX's own shape inference only: onnxruntime's symbolic one knows no ``ReduceLogSumExp`` (the
    log-scores of size-aware fusion) and fails there; where it runs, the quantized graph is the
    same without it (measured on DeiT with the paper's fusion)."""
    require_quantizer('int8')
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process
    with tempfile.TemporaryDirectory() as folder:   # the quantizer reads and writes files
        fp32, prepared, quantized = (os.path.join(folder, name) for name in ('fp32.onnx', 'pre.onnx', 'int8.onnx'))
        with open(fp32, 'wb') as f:
            f.write(data)
        quant_pre_process(fp32, prepared, skip_symbolic_shape=True)
        quantize_dynamic(prepared, quantized, weight_type=QuantType.QInt8)
        model = onnx.load(quantized)
    model.metadata_props.add(key='timm_evit.quantize', value='int8 (dynamic: int8 weights, activations per batch)')
    return model.SerializeToString()


def exported_writer(model: torch.nn.Module, format: str = 'onnx', quantize: Optional[str] = None) -> Writer:
    """Exports ``model`` now and returns a writer of the file's bytes (see ``files.write_all_whole``):
    an export that fails raises here, before any file is opened. (``timm-evit export`` has refused a
    model that computes non-finite values before this: ``checkpoints.require_finite_forward``.)
    ``quantize='int8'``: the ONNX file quantized (``quantized_onnx``)."""
    check_exportable(model, format)
    require_quantizer(quantize, format)
    if format == 'onnx':
        data = onnx_bytes(model)
        if quantize:
            data = quantized_onnx(data)
        return lambda f: f.write(data)
    program = export_program(model)
    return lambda f: torch.export.save(program, f)


def require_onnxruntime():
    """The onnxruntime module, or a ValueError saying how to install it."""
    return _import('onnxruntime', '--runtime onnxruntime')


def onnxruntime_session(model: torch.nn.Module, threads: int = 0, quantize: Optional[str] = None):
    """An onnxruntime CPU session of ``model``'s ONNX export (``quantize='int8'``: quantized, as
    ``export --quantize int8`` writes it); ``threads`` intra-op threads (0: torch's count)."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()   # the same threads as the torch rows
    # No spin-waiting after a run: bench and sweep interleave several sessions and torch, and a
    # session's threads spinning for more work steal the cores from the next call (measured on 2
    # cores: torch's plain DeiT-tiny at batch 32 took 57 ms beside spinning sessions, 23 ms without).
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    data = onnx_bytes(model)
    if quantize:
        data = quantized_onnx(data)
    return ort.InferenceSession(data, options, providers=['CPUExecutionProvider'])


def onnxruntime_forward(model: torch.nn.Module, threads: int = 0,
                        quantize: Optional[str] = None) -> Callable[[torch.Tensor], object]:
    """``model``'s forward through onnxruntime: images (a CPU tensor) in, logits (a NumPy array) out."""
    session = onnxruntime_session(model, threads, quantize)

    def forward(images: torch.Tensor):
        return session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]
    return forward

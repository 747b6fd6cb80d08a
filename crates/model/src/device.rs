//! Where the model runs: the backend named in configuration, resolved to a burn [`Device`]
//! at run time, with the GPU adapter checked before any weight is loaded.
//!
//! `cpu` is burn's `flex` backend. `wgpu` (Cargo feature `gpu`) is burn's WGSL path on
//! the machine's Vulkan (Metal, DX12) driver. A software adapter (Mesa's lavapipe,
//! llvmpipe) runs the same kernels on the CPU, hundreds of times slower than a GPU: it is
//! refused with an error naming the adapters found, unless the configuration allows it
//! (the tests do, to run the GPU code path on machines without a GPU).

use burn::tensor::Device;

use crate::error::ModelError;

/// Where the model runs. Chosen in configuration, resolved to a burn [`Device`] at run time.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Deserialize,
    serde::Serialize,
    strum::IntoStaticStr,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "lowercase")]
pub enum Backend {
    /// The host: Keel's own forward pass and kernels (AVX-512, AVX2 or portable, chosen
    /// at run time), multi-threaded through rayon.
    #[default]
    Cpu,
    /// burn's `wgpu` backend (WGSL kernels through the Vulkan, Metal or DX12 driver).
    /// Needs a binary built with the `gpu` feature (the default build).
    Wgpu,
    /// burn's own SPIR-V kernels on the Vulkan driver, with cooperative-matrix (tensor core)
    /// matmuls where the device has them. Needs a binary built with the `vulkan` feature and
    /// a hardware GPU.
    Vulkan,
}

impl Backend {
    pub fn name(self) -> &'static str {
        self.into()
    }
}

/// What the model's matrix products, attention and GELU compute in.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Deserialize,
    serde::Serialize,
    strum::IntoStaticStr,
    strum::EnumString,
)]
#[serde(rename_all = "snake_case")]
#[strum(
    serialize_all = "lowercase",
    parse_err_ty = String,
    parse_err_fn = unknown_precision
)]
pub enum Precision {
    /// 32-bit floats everywhere: within 1e-4 of the float64 reference.
    #[default]
    F32,
    /// 16-bit floats for the Linear layers, attention and GELU (weights kept in f16 on the
    /// device); the residual stream, LayerNorm and pooling stay f32. GPU backends only.
    F16,
    /// bfloat16 weights and activations in the Linear layers, summed in f32 (AVX-512 BF16
    /// where the CPU has it); everything else f32. CPU backend only.
    Bf16,
    /// int8 weights (per output channel) and activations (per row) in the Linear layers,
    /// summed exactly in int32 (AVX-512 VNNI or AVX2 where the CPU has them); attention,
    /// softmax, GELU, LayerNorm and pooling stay f32. CPU backend only.
    Int8,
}

impl Precision {
    /// Whether `backend` computes in this precision.
    pub fn runs_on(self, backend: Backend) -> bool {
        match self {
            Precision::F32 => true,
            Precision::F16 => matches!(backend, Backend::Wgpu | Backend::Vulkan),
            Precision::Bf16 | Precision::Int8 => backend == Backend::Cpu,
        }
    }

    pub fn name(self) -> &'static str {
        self.into()
    }
}

fn unknown_precision(other: &str) -> String {
    format!("unknown precision {other:?} (f32; f16 on wgpu or vulkan; bf16 or int8 on cpu)")
}

/// What a backend needs beyond its name.
#[derive(Debug, Clone, Copy)]
pub struct DeviceOptions {
    /// Accept a software GPU adapter (lavapipe) when no hardware one is found.
    pub allow_software_gpu: bool,
    /// What the model computes in (`f16` needs a GPU backend, `bf16` and `int8` the CPU).
    pub precision: Precision,
    /// GPU backends: fuse chains of operations into fewer kernels (burn's fusion). One
    /// setting per process (see [`ModelDevice::open`]).
    pub fusion: bool,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        Self {
            allow_software_gpu: false,
            precision: Precision::F32,
            fusion: true,
        }
    }
}

/// A resolved device and what it is.
#[derive(Clone)]
pub struct ModelDevice {
    pub backend: Backend,
    pub device: Device,
    /// The adapter's name and type (`"llvmpipe (LLVM 15.0.6, 256 bits), Cpu, Vulkan"`), or
    /// `"host (f32, avx512 kernels)"` for the CPU backend (`"host (int8, avx2 kernels)"` in a reduced
    /// precision).
    pub adapter: String,
    pub precision: Precision,
}

impl ModelDevice {
    /// Opens `backend`'s device. The CPU backend cannot fail; `wgpu` fails with the
    /// adapters it found when none is usable, and when `fusion` differs from the setting
    /// of a GPU device opened earlier in the process (burn keeps one registry of fusion
    /// optimizations per process, sealed at the first GPU operation).
    pub fn open(backend: Backend, options: DeviceOptions) -> Result<Self, ModelError> {
        match backend {
            _ if !options.precision.runs_on(backend) => Err(ModelError::Precision(format!(
                "the {} backend does not compute in {} (cpu: f32, bf16, int8; wgpu, vulkan: f32, f16)",
                backend.name(),
                options.precision.name()
            ))),
            Backend::Cpu => Ok(Self {
                backend,
                device: Device::flex(),
                adapter: host_adapter(options.precision),
                precision: options.precision,
            }),
            Backend::Wgpu => gpu::open(options),
            Backend::Vulkan => vulkan::open(options),
        }
    }

    /// Whether the device compiles kernels per tensor shape, so that passes are padded to
    /// a few sequence-length buckets ([`crate::LENGTH_BUCKETS`]) and warmed up at start.
    pub fn compiles_per_shape(&self) -> bool {
        !self.is_host()
    }

    /// Whether tensors live in host memory (so host-side kernels may touch them).
    pub fn is_host(&self) -> bool {
        self.backend == Backend::Cpu
    }

    /// Bytes the device's memory pool holds in use and reserved; `None` on the host.
    pub fn memory(&self) -> Option<DeviceMemory> {
        if self.is_host() {
            return None;
        }
        self.device.memory_pool_usage().map(|u| DeviceMemory {
            in_use_bytes: u.bytes_in_use,
            reserved_bytes: u.bytes_reserved,
        })
    }
}

/// What `backend: auto` picked on this machine, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoBackend {
    pub backend: Backend,
    /// One line: the adapter chosen and what it offers, or why each faster backend was
    /// passed over.
    pub why: String,
}

/// The backend this machine and build run the model best on: `vulkan` where a hardware
/// GPU's Vulkan driver compiles burn's SPIR-V and offers cooperative matrices (tensor
/// cores) and the binary has the backend (feature `vulkan`); else `wgpu` on a hardware GPU,
/// or on a software adapter when `allow_software` (tests); else `cpu`. It looks at the
/// adapters and, for `vulkan`, opens the device to read its features; it runs no kernel.
pub fn choose_backend(allow_software: bool) -> AutoBackend {
    let vulkan = match vulkan::probe() {
        Ok(adapter) => {
            return AutoBackend {
                backend: Backend::Vulkan,
                why: format!("{adapter}: cooperative matrices (tensor cores)"),
            };
        }
        Err(why) => why,
    };
    let wgpu = match gpu::probe(allow_software) {
        Ok(adapter) => {
            return AutoBackend {
                backend: Backend::Wgpu,
                why: format!("{adapter}; not vulkan: {vulkan}"),
            };
        }
        Err(why) => why,
    };
    AutoBackend {
        backend: Backend::Cpu,
        why: format!("not vulkan: {vulkan}; not wgpu: {wgpu}"),
    }
}

/// `host (f32, avx512 kernels)`, `host (int8, avx2 kernels)`, `host (f32, amx bf16x3
/// kernels)`, ... (bf16 on AVX-512 names its form: `avx512 vdpbf16ps` or `avx512
/// widened-fma`; on AVX2 `avx2 widened-fma`): which kernels run.
fn host_adapter(precision: Precision) -> String {
    use crate::kernels::{Isa, Kind};
    let kind = match precision {
        Precision::Int8 => Kind::Int8,
        Precision::Bf16 => Kind::Bf16,
        Precision::F32 | Precision::F16 => Kind::F32,
    };
    // `f32` on AMX CPUs runs bf16×3 on the bf16 tiles.
    let (kind, scheme) = if kind == Kind::F32 && crate::kernels::bf16x3::f32_on_tiles() {
        (Kind::Bf16, " bf16x3")
    } else {
        (kind, "")
    };
    let isa = match Isa::detect(kind) {
        Isa::Avx512 if kind == Kind::Bf16 => match crate::kernels::bf16::Avx512Form::detect() {
            crate::kernels::bf16::Avx512Form::DotProduct => "avx512 vdpbf16ps",
            crate::kernels::bf16::Avx512Form::Widened => "avx512 widened-fma",
        },
        Isa::Amx => "amx",
        Isa::Avx2 if kind == Kind::Bf16 => "avx2 widened-fma",
        Isa::Avx512 => "avx512",
        Isa::Avx2 => "avx2",
        Isa::Portable => "portable",
    };
    format!("host ({}, {isa}{scheme} kernels)", precision.name())
}

/// Device memory held by the backend's pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceMemory {
    /// Bytes of live allocations (weights, tensors of a running pass).
    pub in_use_bytes: u64,
    /// Bytes reserved from the driver: in use plus pages kept for reuse.
    pub reserved_bytes: u64,
}

#[cfg(feature = "gpu")]
mod gpu {
    use burn::tensor::{Device, DeviceKind};
    use wgpu::{Backends, DeviceType, Instance, InstanceDescriptor};

    use super::{Backend, DeviceOptions, ModelDevice, Precision};
    use crate::error::ModelError;

    /// Picks a hardware adapter (discrete, then integrated, then virtual), or a software
    /// one when allowed; burn's `DeviceKind` indexes adapters of one type in the order
    /// wgpu enumerates them, which is the order used here.
    /// The adapter `wgpu` would run on, for `backend: auto`: `Err` says why none.
    pub(super) fn probe(allow_software: bool) -> Result<String, String> {
        pick(allow_software)
            .map(|(_, adapter)| adapter)
            .map_err(|e| e.to_string())
    }

    pub(super) fn open(options: DeviceOptions) -> Result<ModelDevice, ModelError> {
        let chosen = pick(options.allow_software_gpu)?;
        tracing::info!(adapter = %chosen.1, fusion = options.fusion, "GPU adapter");
        set_fusion(options.fusion)?;
        if chosen.0 == DeviceKind::Cpu {
            tune_lightly();
        }
        let device = Device::wgpu(chosen.0);
        if options.precision == Precision::F16 && !device.supports_dtype(burn::tensor::DType::F16) {
            return Err(ModelError::Precision(format!(
                "the adapter {} cannot compute in f16 (no shader-f16 support); use precision: f32",
                chosen.1
            )));
        }
        Ok(ModelDevice {
            backend: Backend::Wgpu,
            device,
            adapter: chosen.1,
            precision: options.precision,
        })
    }

    /// burn's device kind and the adapter's description, for the adapter `wgpu` runs on.
    fn pick(allow_software: bool) -> Result<(DeviceKind, String), ModelError> {
        let backends = Backends::VULKAN | Backends::METAL | Backends::DX12;
        let instance = Instance::new(InstanceDescriptor {
            backends,
            ..InstanceDescriptor::new_without_display_handle()
        });
        let adapters: Vec<wgpu::AdapterInfo> =
            futures::executor::block_on(instance.enumerate_adapters(backends))
                .into_iter()
                .map(|a| a.get_info())
                .collect();
        let describe =
            |a: &wgpu::AdapterInfo| format!("{}, {:?}, {:?}", a.name, a.device_type, a.backend);
        // The first adapter of a type is burn's index 0 of that type.
        let pick = |wanted: DeviceType| {
            adapters
                .iter()
                .find(|a| a.device_type == wanted)
                .map(|a| (0, a))
        };
        let chosen = [
            (
                DeviceType::DiscreteGpu,
                DeviceKind::DiscreteGpu as fn(usize) -> DeviceKind,
            ),
            (DeviceType::IntegratedGpu, DeviceKind::IntegratedGpu),
            (DeviceType::VirtualGpu, DeviceKind::VirtualGpu),
        ]
        .into_iter()
        .find_map(|(t, kind)| pick(t).map(|(i, a)| (kind(i), describe(a))));
        let chosen = match chosen {
            Some(c) => c,
            None => match pick(DeviceType::Cpu) {
                Some((_, a)) if allow_software => (DeviceKind::Cpu, describe(a)),
                _ => {
                    let found: Vec<String> = adapters.iter().map(describe).collect();
                    return Err(ModelError::NoGpu {
                        found,
                        software_allowed: allow_software,
                    });
                }
            },
        };
        // A build with burn's SPIR-V compiler (feature `vulkan`) compiles `wgpu`'s kernels
        // to SPIR-V too on Vulkan adapters, and those crash Mesa's software adapter.
        if cfg!(feature = "vulkan") && chosen.0 == DeviceKind::Cpu {
            return Err(ModelError::DeviceUnfit(format!(
                "{}: a software adapter cannot run this binary's GPU kernels (it is built with the \
                 `vulkan` feature, whose SPIR-V kernels crash software adapters); use a build \
                 without it for software rendering",
                chosen.1
            )));
        }
        Ok(chosen)
    }

    /// burn fuses chains of element-wise operations (and matmul epilogues) into single
    /// kernels. Its optimizations are a process-wide registry that seals at the first
    /// operation on a GPU device, so one setting holds for every GPU model of a process:
    /// the first device opened decides, and a later one asking otherwise is refused.
    pub(super) fn set_fusion(on: bool) -> Result<(), ModelError> {
        static CHOSEN: std::sync::OnceLock<Result<bool, String>> = std::sync::OnceLock::new();
        let chosen = CHOSEN.get_or_init(|| {
            if !on {
                // With every optimization removed, each operation runs as its own kernel:
                // what the backend computes without fusion.
                for name in burn_cubecl::fusion::BUILTIN_NAMES {
                    burn_cubecl::fusion::remove(name).map_err(|e| e.to_string())?;
                }
            }
            Ok(on)
        });
        match chosen {
            Ok(c) if *c == on => Ok(()),
            Ok(c) => Err(ModelError::Fusion(format!(
                "kernel fusion is already {} in this process; every GPU device of a process shares one setting",
                if *c { "on" } else { "off" }
            ))),
            Err(e) => Err(ModelError::Fusion(e.clone())),
        }
    }

    /// On a software adapter, kernels run hundreds of times slower than on a GPU, and
    /// autotuning's benchmarks (every candidate kernel, timed ten times, per shape) take
    /// minutes: there, candidates are timed once and the first one within 60 % of the
    /// adapter's peak is kept. What the kernels compute is the same. `CUBECL_*` environment
    /// variables still override; a process whose kernel runtime is already configured
    /// (a `cubecl.toml`, an earlier device) keeps its settings.
    fn tune_lightly() {
        use cubecl::config::autotune::AutotuneLevel;
        use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
        let mut config = CubeClRuntimeConfig::default();
        config.autotune.level = AutotuneLevel::Minimal;
        config.autotune.bench.min_samples = 1;
        config.autotune.bench.max_samples = 1;
        if !CubeClRuntimeConfig::try_set(config.override_from_env()) {
            tracing::debug!("kernel runtime already configured; autotune settings kept");
        }
    }
}

/// burn's SPIR-V path: the device pinned to Vulkan, checked to compile SPIR-V (cubecl
/// falls back to WGSL on a device without the Vulkan features its SPIR-V compiler needs,
/// which would make `vulkan` a second name for `wgpu`).
#[cfg(feature = "vulkan")]
mod vulkan {
    use burn::tensor::{Device, DeviceKind};
    use cubecl::wgpu::{WgpuBackend, WgpuDevice, WgpuDeviceKind};
    use wgpu::{Backends, DeviceType, Instance, InstanceDescriptor};

    use super::{Backend, DeviceOptions, ModelDevice, Precision};
    use crate::error::ModelError;

    /// The adapter `vulkan` would run on with cooperative matrices, for `backend: auto`:
    /// `Err` says why not.
    pub(super) fn probe() -> Result<String, String> {
        let (_, wgpu_kind, adapter) = pick().map_err(|e| e.to_string())?;
        let (compiler, tensor_cores) = inspect(wgpu_kind);
        if compiler != "wgpu<spirv>" {
            return Err(format!(
                "{adapter}: the driver lacks the features burn's SPIR-V compiler needs"
            ));
        }
        if !tensor_cores {
            return Err(format!("{adapter}: no cooperative matrices"));
        }
        Ok(format!("{adapter}, SPIR-V"))
    }

    /// The compute client burn's device will use (one per device and graphics API): its
    /// compiler's name and whether it offers cooperative-matrix matmuls.
    fn inspect(wgpu_kind: WgpuDeviceKind) -> (String, bool) {
        let client = cubecl::Device::Wgpu(WgpuDevice {
            kind: wgpu_kind,
            backend: WgpuBackend::Vulkan,
        })
        .client();
        let tensor_cores = !client.properties().features.matmul.cmma.is_empty();
        (client.name().to_string(), tensor_cores)
    }

    pub(super) fn open(options: DeviceOptions) -> Result<ModelDevice, ModelError> {
        let (kind, wgpu_kind, adapter) = pick()?;
        super::gpu::set_fusion(options.fusion)?;
        let (compiler, tensor_cores) = inspect(wgpu_kind);
        if compiler != "wgpu<spirv>" {
            return Err(ModelError::DeviceUnfit(format!(
                "{adapter}: the Vulkan driver lacks the features burn's SPIR-V compiler needs \
                 (the runtime fell back to {compiler}); use backend: wgpu"
            )));
        }
        let device = Device::vulkan(kind);
        if options.precision == Precision::F16 && !device.supports_dtype(burn::tensor::DType::F16) {
            return Err(ModelError::Precision(format!(
                "the adapter {adapter} cannot compute in f16; use precision: f32"
            )));
        }
        let adapter = format!(
            "{adapter}, SPIR-V, {}",
            if tensor_cores {
                "cooperative matrices"
            } else {
                "no cooperative matrices"
            }
        );
        tracing::info!(%adapter, fusion = options.fusion, "GPU adapter (vulkan)");
        Ok(ModelDevice {
            backend: Backend::Vulkan,
            device,
            adapter,
            precision: options.precision,
        })
    }

    /// The hardware Vulkan adapter (discrete, then integrated, then virtual): burn's and
    /// cubecl's device kinds and its description.
    fn pick() -> Result<(DeviceKind, WgpuDeviceKind, String), ModelError> {
        let instance = Instance::new(InstanceDescriptor {
            backends: Backends::VULKAN,
            ..InstanceDescriptor::new_without_display_handle()
        });
        let adapters: Vec<wgpu::AdapterInfo> =
            futures::executor::block_on(instance.enumerate_adapters(Backends::VULKAN))
                .into_iter()
                .map(|a| a.get_info())
                .collect();
        let describe = |a: &wgpu::AdapterInfo| format!("{}, {:?}, Vulkan", a.name, a.device_type);
        let chosen = [
            (
                DeviceType::DiscreteGpu,
                DeviceKind::DiscreteGpu(0),
                WgpuDeviceKind::DiscreteGpu(0),
            ),
            (
                DeviceType::IntegratedGpu,
                DeviceKind::IntegratedGpu(0),
                WgpuDeviceKind::IntegratedGpu(0),
            ),
            (
                DeviceType::VirtualGpu,
                DeviceKind::VirtualGpu(0),
                WgpuDeviceKind::VirtualGpu(0),
            ),
        ]
        .into_iter()
        .find_map(|(t, kind, wgpu_kind)| {
            adapters
                .iter()
                .find(|a| a.device_type == t)
                .map(|a| (kind, wgpu_kind, describe(a)))
        });
        // Software adapters are refused whatever `allow_software` says: burn's SPIR-V
        // kernels abort the process on Mesa's lavapipe (the `wgpu` backend runs there).
        let Some((kind, wgpu_kind, adapter)) = chosen else {
            return Err(ModelError::DeviceUnfit(format!(
                "the vulkan backend needs a hardware GPU on a Vulkan driver (found: {}); \
                 a software adapter runs only the wgpu backend",
                if adapters.is_empty() {
                    "no Vulkan adapter".to_string()
                } else {
                    adapters.iter().map(describe).collect::<Vec<_>>().join("; ")
                }
            )));
        };
        Ok((kind, wgpu_kind, adapter))
    }
}

#[cfg(not(feature = "vulkan"))]
mod vulkan {
    use super::{DeviceOptions, ModelDevice};
    use crate::error::ModelError;

    pub(super) fn probe() -> Result<String, String> {
        Err("this binary is built without it (cargo feature `vulkan`)".into())
    }

    pub(super) fn open(_: DeviceOptions) -> Result<ModelDevice, ModelError> {
        Err(ModelError::BackendUnavailable {
            backend: "vulkan",
            feature: "vulkan",
        })
    }
}

#[cfg(not(feature = "gpu"))]
mod gpu {
    use super::{DeviceOptions, ModelDevice};
    use crate::error::ModelError;

    pub(super) fn probe(_: bool) -> Result<String, String> {
        Err("this binary is built without GPU backends (cargo feature `gpu`)".into())
    }

    pub(super) fn open(_: DeviceOptions) -> Result<ModelDevice, ModelError> {
        Err(ModelError::BackendUnavailable {
            backend: "wgpu",
            feature: "gpu",
        })
    }
}

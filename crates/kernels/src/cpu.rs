//! The CPU's features, detected once per engine: every kernel dispatch in this module takes
//! the resulting [`Kernels`], so that what runs is decided in one place and a test can force
//! the portable code on any host.

/// The instruction set a [`Kernels`] value stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Our AVX-512 microkernel on pre-packed panels.
    Avx512,
    /// The same microkernel on bf16 operands with fp32 accumulators (AVX512-BF16).
    Avx512Bf16,
    /// bf16 operands on AMX tiles (`amx.rs`), fp32 accumulators.
    Amx,
    /// u8 x s8 products for `WeightsI8` (AVX512-VNNI, `int8.rs`), and for float weights the
    /// products of `Avx512Bf16`, which every such CPU here also has.
    Avx512Vnni,
    /// Our AVX2 + FMA microkernel (`avx2.rs`) on pre-packed panels: fp32 only.
    Avx2,
    /// The `gemm` crate with a plain epilogue: any CPU.
    Portable,
}

/// Which kernels run, as a token: only [`Kernels::detect`], [`Kernels::all_fp32`],
/// [`Kernels::detect_bf16`], [`Kernels::all_bf16`] and [`Kernels::portable`] make one, so
/// holding a `Kernels` means this CPU runs its instructions. Code that executes
/// `target_feature` functions relies on that.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernels(Isa);

impl Kernels {
    /// The fastest fp32 kernels this CPU runs.
    pub fn detect() -> Self {
        Self::all_fp32()[0]
    }

    /// Every fp32 kernel set this CPU runs, fastest first, for tests: on an AVX-512 CPU the
    /// AVX2 one as well, and the portable one last.
    pub fn all_fp32() -> Vec<Self> {
        let mut all = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512dq") && has!("avx512vl") && has!("fma") {
                all.push(Self(Isa::Avx512));
            }
            if has!("avx2") && has!("fma") {
                all.push(Self(Isa::Avx2));
            }
        }
        all.push(Self(Isa::Portable));
        all
    }

    /// bf16 kernels, where the CPU has them: AMX tiles where it has those too (and the OS
    /// grants them).
    pub fn detect_bf16() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if Self::detect().0 == Isa::Avx512 && has!("avx512bw") && has!("avx512bf16") {
                return Some(Self(if crate::amx::available() {
                    Isa::Amx
                } else {
                    Isa::Avx512Bf16
                }));
            }
        }
        None
    }

    /// Whether the bf16 kernels outrun the fp32 ones on this CPU, as measured
    /// (docs/performance.md): on AMX tiles 1.7-3.6x on an Intel Xeon; on AVX512-BF16
    /// instructions 1.4-1.8x on AMD Zen 5, but 0.61-0.79x on that Xeon, whose `vdpbf16ps`
    /// issues at half its FMA rate.
    pub fn bf16_is_faster() -> bool {
        match Self::detect_bf16().map(Self::isa) {
            Some(Isa::Amx) => true,
            Some(Isa::Avx512Bf16) => vendor_is_amd(),
            _ => false,
        }
    }

    /// int8 kernels, where the CPU has AVX512-VNNI beside AVX512-BF16 (AMD Zen 4 and 5, Intel
    /// Xeons from Sapphire Rapids).
    pub fn detect_int8() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        if Self::detect_bf16().is_some() && std::arch::is_x86_feature_detected!("avx512vnni") {
            return Some(Self(Isa::Avx512Vnni));
        }
        None
    }

    /// Every int8 kernel set this CPU runs, the portable one last, for tests.
    pub fn all_int8() -> Vec<Self> {
        Self::detect_int8().into_iter().chain([Self::portable()]).collect()
    }

    /// Plain code that runs anywhere: the reference the others are tested against.
    pub fn portable() -> Self {
        Self(Isa::Portable)
    }

    /// Every bf16 kernel set this CPU runs, for tests: on an AMX CPU the AVX-512 one as well.
    pub fn all_bf16() -> Vec<Self> {
        match Self::detect_bf16() {
            Some(Self(Isa::Amx)) => vec![Self(Isa::Avx512Bf16), Self(Isa::Amx)],
            other => other.into_iter().collect(),
        }
    }

    pub fn isa(self) -> Isa {
        self.0
    }

    /// Whether products round their operands to bf16.
    pub fn is_bf16(self) -> bool {
        matches!(self.0, Isa::Avx512Bf16 | Isa::Amx | Isa::Avx512Vnni)
    }

    /// Whether the AVX-512 fp32 code (microkernel, Winograd transforms) may run.
    pub fn has_avx512(self) -> bool {
        self.0 != Isa::Avx2 && self.0 != Isa::Portable
    }

    /// The fp32 kernels for the layers a bf16 engine keeps in fp32 (every bf16 set implies
    /// AVX-512).
    pub fn fp32(self) -> Self {
        if self.is_bf16() {
            Self(Isa::Avx512)
        } else {
            self
        }
    }

    /// For logs and benchmark headers.
    pub fn name(self) -> &'static str {
        match self.0 {
            Isa::Avx512 => "AVX-512",
            Isa::Avx512Bf16 => "AVX512-BF16",
            Isa::Amx => "AMX bf16 tiles",
            Isa::Avx512Vnni => "AVX512-VNNI int8",
            Isa::Avx2 => "AVX2",
            Isa::Portable => "portable (gemm crate)",
        }
    }
}

/// Whether CPUID names AMD as the vendor.
fn vendor_is_amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let id = std::arch::x86_64::__cpuid(0);
        // "AuthenticAMD", in EBX, EDX, ECX order.
        [id.ebx, id.edx, id.ecx] == [0x6874_7541, 0x6974_6E65, 0x444D_4163]
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

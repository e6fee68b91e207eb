//! Architecture hyper-parameters: the six published presets and custom configurations.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The published FasterNet sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    T0,
    T1,
    T2,
    S,
    M,
    L,
}

/// One published size: adding a variant is its name in [`Variant`] and a row in [`PRESETS`].
struct Preset {
    variant: Variant,
    name: &'static str,
    embed_dim: usize,
    depths: [usize; 4],
    act: Activation,
}

/// The paper's Table 1 (mlp_ratio 2, n_div 4 and feature_dim 1280 are shared).
const PRESETS: [Preset; 6] = {
    use Activation::*;
    use Variant::*;
    [
        Preset { variant: T0, name: "t0", embed_dim: 40, depths: [1, 2, 8, 2], act: Gelu },
        Preset { variant: T1, name: "t1", embed_dim: 64, depths: [1, 2, 8, 2], act: Gelu },
        Preset { variant: T2, name: "t2", embed_dim: 96, depths: [1, 2, 8, 2], act: Relu },
        Preset { variant: S, name: "s", embed_dim: 128, depths: [1, 2, 13, 2], act: Relu },
        Preset { variant: M, name: "m", embed_dim: 144, depths: [3, 4, 18, 3], act: Relu },
        Preset { variant: L, name: "l", embed_dim: 192, depths: [3, 4, 18, 3], act: Relu },
    ]
};

impl Variant {
    pub const ALL: [Variant; PRESETS.len()] = {
        let mut all = [Variant::T0; PRESETS.len()];
        let mut i = 0;
        while i < all.len() {
            all[i] = PRESETS[i].variant;
            i += 1;
        }
        all
    };

    fn preset(self) -> &'static Preset {
        PRESETS.iter().find(|p| p.variant == self).expect("every variant has a preset row")
    }

    pub fn name(self) -> &'static str {
        self.preset().name
    }

    fn shape(self) -> (usize, [usize; 4], Activation) {
        let p = self.preset();
        (p.embed_dim, p.depths, p.act)
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Variant {
    type Err = String;

    /// Accepts `t0`, `T0` and timm's `fasternet_t0`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let short = s.trim().to_ascii_lowercase();
        let short = short.strip_prefix("fasternet_").unwrap_or(&short);
        Self::ALL.into_iter().find(|v| v.name() == short).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|v| v.name()).collect();
            format!("unknown FasterNet variant `{s}` (expected one of {})", names.join(", "))
        })
    }
}

/// The block activation. GELU is the exact erf form, as `torch.nn.GELU()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Gelu,
    Relu,
}

impl FromStr for Activation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "gelu" => Ok(Self::Gelu),
            "relu" => Ok(Self::Relu),
            other => Err(format!("unknown activation `{other}` (expected gelu or relu)")),
        }
    }
}

/// Everything that fixes the network's tensor shapes and arithmetic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FasterNetConfig {
    pub embed_dim: usize,
    pub depths: [usize; 4],
    pub mlp_ratio: f64,
    pub n_div: usize,
    pub feature_dim: usize,
    pub num_classes: usize,
    pub act: Activation,
}

impl FasterNetConfig {
    pub const MLP_RATIO: f64 = 2.0;
    pub const N_DIV: usize = 4;
    pub const FEATURE_DIM: usize = 1280;
    /// Smallest input side: the stem (/4) and three merges (/2 each) must leave one pixel.
    pub const MIN_INPUT_SIDE: usize = 32;
    /// Largest input side served: 9x the published 224. Memory for the activations grows with
    /// its square; the server checks the batch at this size against its budget too.
    pub const MAX_INPUT_SIDE: usize = 2048;

    pub fn preset(variant: Variant, num_classes: usize) -> Self {
        let (embed_dim, depths, act) = variant.shape();
        Self {
            embed_dim,
            depths,
            mlp_ratio: Self::MLP_RATIO,
            n_div: Self::N_DIV,
            feature_dim: Self::FEATURE_DIM,
            num_classes,
            act,
        }
    }

    /// The preset this configuration is, if any (the number of classes may differ).
    pub fn variant(&self) -> Option<Variant> {
        Variant::ALL.into_iter().find(|&v| Self::preset(v, self.num_classes) == *self)
    }

    /// `fasternet_t0` for presets, `fasternet_custom` otherwise.
    pub fn architecture(&self) -> String {
        match self.variant() {
            Some(v) => format!("fasternet_{v}"),
            None => "fasternet_custom".to_string(),
        }
    }

    /// Channels of stage `i` (0..4).
    pub fn stage_dim(&self, i: usize) -> usize {
        self.embed_dim << i
    }

    /// Channels the partial 3x3 convolution touches in a block of `dim` channels.
    pub fn partial_dim(&self, dim: usize) -> usize {
        dim / self.n_div
    }

    pub fn hidden_dim(&self, dim: usize) -> usize {
        (dim as f64 * self.mlp_ratio) as usize
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.embed_dim == 0 || self.feature_dim == 0 || self.num_classes == 0 {
            return Err("embed_dim, feature_dim and num_classes must be positive".into());
        }
        if self.n_div == 0 || self.embed_dim < self.n_div {
            return Err(format!(
                "n_div {} must be in 1..=embed_dim {}",
                self.n_div, self.embed_dim
            ));
        }
        if self.depths.contains(&0) {
            return Err(format!(
                "every stage needs at least one block, got depths {:?}",
                self.depths
            ));
        }
        if self.hidden_dim(self.embed_dim) == 0 {
            return Err(format!("mlp_ratio {} gives an empty hidden layer", self.mlp_ratio));
        }
        Ok(())
    }

    /// Multiply-accumulates of one forward pass at `h` x `w` (convolutions and the classifier).
    pub fn macs(&self, h: usize, w: usize) -> u64 {
        let (mut h, mut w) = (h / 4, w / 4);
        let mut macs = (h * w * self.embed_dim * 3 * 16) as u64;
        for (i, &depth) in self.depths.iter().enumerate() {
            let dim = self.stage_dim(i);
            if i > 0 {
                h /= 2;
                w /= 2;
                macs += (h * w * dim * (dim / 2) * 4) as u64;
            }
            let cp = self.partial_dim(dim);
            let per_block = cp * cp * 9 + 2 * dim * self.hidden_dim(dim);
            macs += (h * w * per_block * depth) as u64;
        }
        macs + (self.stage_dim(3) * self.feature_dim + self.feature_dim * self.num_classes) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The match is exhaustive: a new variant does not compile here until it is named, and
    /// then fails until it has its row in `PRESETS`.
    #[test]
    fn every_variant_has_a_preset_row() {
        use Variant::*;
        for v in [T0, T1, T2, S, M, L] {
            match v {
                T0 | T1 | T2 | S | M | L => assert!(Variant::ALL.contains(&v), "{v:?}"),
            }
        }
    }

    #[test]
    fn presets_round_trip_through_names() {
        for v in Variant::ALL {
            assert_eq!(v.name().parse::<Variant>().unwrap(), v);
            assert_eq!(format!("fasternet_{v}").parse::<Variant>().unwrap(), v);
            assert_eq!(FasterNetConfig::preset(v, 1000).variant(), Some(v));
        }
        assert!("t3".parse::<Variant>().is_err());
    }

    #[test]
    fn macs_match_the_paper() {
        // GMACs at 224 from the paper: 0.34, 0.85, 1.9, 4.55, 8.72, 15.49.
        let expected = [0.34, 0.85, 1.9, 4.55, 8.72, 15.49];
        for (v, want) in Variant::ALL.into_iter().zip(expected) {
            let got = FasterNetConfig::preset(v, 1000).macs(224, 224) as f64 / 1e9;
            assert!((got - want).abs() / want < 0.03, "{v}: {got:.3} GMACs, paper {want}");
        }
    }
}

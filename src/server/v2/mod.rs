//! The Open Inference Protocol (KServe v2), spoken over REST ([`rest`]) and gRPC ([`grpc`]).
//! This module holds what both share: the model's tensors and metadata, and the conversion of
//! request tensors into [`Input`]s and of answers into output tensors. Requests then take the
//! same path as `/classify` ([`super::inference::infer`]).
//!
//! The model takes one input, either `image` (BYTES, shape `[N]` or `[N, 1]`: image files in
//! any format `/classify` accepts) or `pixels` (FP32, `[N, 3, H, W]`: preprocessed already),
//! and has two outputs: `probabilities` (FP32 `[N, classes]`) and `features` (FP32
//! `[N, 1280]`).
//! The classification extension turns `probabilities` into BYTES `"score:index:label"`.

pub mod grpc;
pub mod rest;

use bytes::Bytes;
use candle_core::{Device, Tensor};

use super::error::ApiError;
use super::inference::{Inferred, Input};
use super::input::EncodedImage;
use super::AppState;
use crate::classifier::Task;

/// The one version of the model this server has.
pub const MODEL_VERSION: &str = "1";
pub const PLATFORM: &str = "fasternet_candle";
pub const EXTENSIONS: &[&str] = &["classification", "binary_tensor_data"];
pub const IMAGE: &str = "image";
pub const PIXELS: &str = "pixels";
pub const PROBABILITIES: &str = "probabilities";
pub const FEATURES: &str = "features";

/// A tensor's name, datatype and shape (-1: any size) in the model's metadata.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct TensorMetadata {
    pub name: &'static str,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
}

/// The model's inputs and outputs.
pub fn tensors(state: &AppState) -> (Vec<TensorMetadata>, Vec<TensorMetadata>) {
    let (h, w) = state.classifier.preprocessor().config.input_size;
    let config = state.classifier.model().config();
    let inputs = vec![
        TensorMetadata { name: IMAGE, datatype: "BYTES", shape: vec![-1] },
        TensorMetadata { name: PIXELS, datatype: "FP32", shape: vec![-1, 3, h as i64, w as i64] },
    ];
    let outputs = vec![
        TensorMetadata {
            name: PROBABILITIES,
            datatype: "FP32",
            shape: vec![-1, config.num_classes as i64],
        },
        TensorMetadata {
            name: FEATURES,
            datatype: "FP32",
            shape: vec![-1, config.feature_dim as i64],
        },
    ];
    (inputs, outputs)
}

/// Checks that a request names the served model (and its version, if it names one).
pub fn check_model(state: &AppState, name: &str, version: Option<&str>) -> Result<(), ApiError> {
    let served = state.classifier.name();
    if name != served || version.is_some_and(|v| !v.is_empty() && v != MODEL_VERSION) {
        let asked = match version {
            Some(v) if !v.is_empty() => format!("`{name}` version `{v}`"),
            _ => format!("`{name}`"),
        };
        return Err(ApiError::UnknownModel(format!(
            "unknown model {asked}: this server serves `{served}` (version {MODEL_VERSION})"
        )));
    }
    Ok(())
}

/// One request input's values, as a transport carries them.
pub enum Data<'a> {
    /// Raw little-endian bytes: the binary data extension, or gRPC's `raw_input_contents`.
    /// BYTES elements are each a 4-byte little-endian length and the bytes.
    Raw(Bytes),
    /// Values parsed already, one chunk per image for FP32.
    Bytes(Vec<Bytes>),
    Fp32(Vec<Vec<f32>>),
    /// JSON `data` (nested arrays allowed), parsed once the expected size is known.
    Json(&'a serde_json::value::RawValue),
}

/// The input a request names, before its values are read.
pub struct InputTensor<'a> {
    pub name: &'a str,
    pub datatype: &'a str,
    pub shape: &'a [i64],
    pub data: Data<'a>,
}

/// What the values of the request's input must be.
#[derive(Debug, Clone, Copy)]
pub enum Expected {
    /// `images` encoded images.
    Images { images: usize },
    /// `images` tensors of `per_image` floats each.
    Pixels { images: usize, per_image: usize },
}

/// The request's one input to the model's inputs, checking names, datatypes, shapes and sizes
/// before any value is read.
pub fn read_inputs(state: &AppState, inputs: Vec<InputTensor>) -> Result<Vec<Input>, ApiError> {
    let bad = |m: String| ApiError::InvalidRequest(m);
    let [input]: [InputTensor; 1] = inputs.try_into().map_err(|inputs: Vec<InputTensor>| {
        bad(format!(
            "{} inputs given; the model takes exactly one: `{IMAGE}` (BYTES) or `{PIXELS}` (FP32)",
            inputs.len()
        ))
    })?;
    let (h, w) = state.classifier.preprocessor().config.input_size;
    let expected = match (input.name, input.datatype) {
        (IMAGE, "BYTES") => match *input.shape {
            [n] | [n, 1] => Expected::Images { images: images(n)? },
            _ => {
                return Err(bad(format!(
                    "input `{IMAGE}` has shape {:?}; expected [N] or [N, 1]",
                    input.shape
                )))
            }
        },
        (PIXELS, "FP32") => match *input.shape {
            [n, 3, hh, ww] if hh == h as i64 && ww == w as i64 => {
                Expected::Pixels { images: images(n)?, per_image: 3 * h * w }
            }
            _ => {
                return Err(bad(format!(
                    "input `{PIXELS}` has shape {:?}; expected [N, 3, {h}, {w}]",
                    input.shape
                )))
            }
        },
        (IMAGE | PIXELS, datatype) => {
            return Err(bad(format!(
                "input `{}` has datatype {datatype}; `{IMAGE}` is BYTES and `{PIXELS}` FP32",
                input.name
            )))
        }
        (name, _) => {
            return Err(bad(format!(
                "unknown input `{name}`: the model takes `{IMAGE}` (BYTES) or `{PIXELS}` (FP32)"
            )))
        }
    };
    let limit = state.config.max_images_per_request;
    let count = match expected {
        Expected::Images { images } | Expected::Pixels { images, .. } => images,
    };
    if count > limit {
        return Err(ApiError::TooManyImages { count, limit });
    }
    let name = input.name;
    let data = match input.data {
        Data::Raw(raw) => read_raw(raw, expected),
        Data::Json(json) => read_json(json, expected),
        other => Ok(other),
    }
    .map_err(|m| bad(format!("input `{name}`: {m}")))?;
    let inputs: Vec<Input> = match (data, expected) {
        (Data::Bytes(files), Expected::Images { images }) if files.len() == images => files
            .into_iter()
            .map(|bytes| Input::Encoded(EncodedImage { filename: None, bytes }))
            .collect(),
        (Data::Fp32(chunks), Expected::Pixels { images, per_image })
            if chunks.len() == images && chunks.iter().all(|c| c.len() == per_image) =>
        {
            chunks
                .into_iter()
                .map(|c| Tensor::from_vec(c, (3, h, w), &Device::Cpu).map(Input::Pixels))
                .collect::<Result<_, _>>()
                .map_err(|e| ApiError::Internal(e.to_string()))?
        }
        (Data::Bytes(_) | Data::Fp32(_), _) => {
            return Err(bad(format!(
                "input `{name}`: its data does not have the {} elements its shape says",
                input.shape.iter().product::<i64>()
            )))
        }
        _ => unreachable!("raw and JSON data were read above"),
    };
    Ok(inputs)
}

fn images(n: i64) -> Result<usize, ApiError> {
    usize::try_from(n)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| ApiError::InvalidRequest(format!("the batch size {n} must be positive")))
}

/// Binary data: BYTES as length-prefixed elements (slices of the body, no copy), FP32 as
/// little-endian floats.
fn read_raw(raw: Bytes, expected: Expected) -> Result<Data<'static>, String> {
    match expected {
        Expected::Images { images } => {
            let mut files = Vec::with_capacity(images);
            let mut at = 0;
            while at < raw.len() {
                let header =
                    raw.get(at..at + 4).ok_or("a BYTES element's 4-byte length is cut off")?;
                let len = u32::from_le_bytes(header.try_into().expect("4 bytes")) as usize;
                let start = at + 4;
                if len > raw.len() - start {
                    return Err("a BYTES element is longer than the data left".into());
                }
                if files.len() == images {
                    return Err(format!("more than the {images} elements its shape says"));
                }
                files.push(raw.slice(start..start + len));
                at = start + len;
            }
            Ok(Data::Bytes(files))
        }
        Expected::Pixels { images, per_image } => {
            if raw.len() != images * per_image * 4 {
                return Err(format!(
                    "{} bytes of data, but its shape needs {} (FP32)",
                    raw.len(),
                    images * per_image * 4
                ));
            }
            let chunks = raw
                .chunks_exact(per_image * 4)
                .map(|image| {
                    image
                        .chunks_exact(4)
                        .map(|v| f32::from_le_bytes(v.try_into().expect("4 bytes")))
                        .collect()
                })
                .collect();
            Ok(Data::Fp32(chunks))
        }
    }
}

/// JSON data, flattened from nested arrays in row-major order: BYTES elements are strings
/// holding base64 (a JSON string cannot hold an image file's bytes), FP32 elements numbers.
/// Parsing stops at the first element beyond what the shape says.
fn read_json(
    json: &serde_json::value::RawValue,
    expected: Expected,
) -> Result<Data<'static>, String> {
    use serde::de::DeserializeSeed;
    let mut collected = Collected::new(expected);
    let mut de = serde_json::Deserializer::from_str(json.get());
    Flat(&mut collected).deserialize(&mut de).map_err(|e| e.to_string())?;
    Ok(match collected {
        Collected::Files { files, .. } => Data::Bytes(files),
        Collected::Floats { mut chunks, current, .. } => {
            if !current.is_empty() {
                chunks.push(current);
            }
            Data::Fp32(chunks)
        }
    })
}

enum Collected {
    Files { files: Vec<Bytes>, images: usize },
    Floats { chunks: Vec<Vec<f32>>, current: Vec<f32>, images: usize, per_image: usize },
}

impl Collected {
    fn new(expected: Expected) -> Self {
        match expected {
            Expected::Images { images } => {
                Self::Files { files: Vec::with_capacity(images), images }
            }
            Expected::Pixels { images, per_image } => Self::Floats {
                chunks: Vec::with_capacity(images),
                current: Vec::with_capacity(per_image),
                images,
                per_image,
            },
        }
    }
}

/// A JSON array, nested to any depth, whose leaves go into a [`Collected`].
struct Flat<'c>(&'c mut Collected);

impl<'de> serde::de::DeserializeSeed<'de> for Flat<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Flat<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self.0 {
            Collected::Files { .. } => f.write_str("an array of base64 strings"),
            Collected::Floats { .. } => f.write_str("an array of numbers"),
        }
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Flat(&mut *self.0))?.is_some() {}
        Ok(())
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        let Collected::Files { files, images } = self.0 else {
            return Err(E::invalid_type(serde::de::Unexpected::Str("…"), &self));
        };
        if files.len() == *images {
            return Err(E::custom(format!("more than the {images} elements its shape says")));
        }
        let file = super::input::decode_base64(v)
            .map_err(|e| E::custom(format!("element {} is not base64: {e}", files.len())))?;
        files.push(file);
        Ok(())
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        let Collected::Floats { chunks, current, images, per_image } = self.0 else {
            return Err(E::invalid_type(serde::de::Unexpected::Float(v), &self));
        };
        if current.len() == *per_image {
            if chunks.len() + 1 == *images {
                return Err(E::custom(format!(
                    "more than the {} elements its shape says",
                    *images * *per_image
                )));
            }
            chunks.push(std::mem::replace(current, Vec::with_capacity(*per_image)));
        }
        current.push(v as f32);
        Ok(())
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.visit_f64(v as f64)
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.visit_f64(v as f64)
    }
}

/// An output the client asked for.
#[derive(Debug, Clone)]
pub struct Requested {
    pub name: String,
    /// The classification extension: the top `k` classes as strings.
    pub classification: Option<usize>,
    /// The binary data extension: raw bytes after the JSON (REST only).
    pub binary: Option<bool>,
}

/// Checks the requested outputs (none: both, plain) and picks the worker's task.
pub fn plan_outputs(
    state: &AppState,
    requested: Option<Vec<Requested>>,
) -> Result<(Vec<Requested>, Task), ApiError> {
    let requested = requested.filter(|r| !r.is_empty()).unwrap_or_else(|| {
        [PROBABILITIES, FEATURES]
            .map(|name| Requested { name: name.into(), classification: None, binary: None })
            .into()
    });
    let classes = state.classifier.labels().len();
    for (i, r) in requested.iter().enumerate() {
        if requested[..i].iter().any(|o| o.name == r.name) {
            return Err(ApiError::InvalidRequest(format!("output `{}` requested twice", r.name)));
        }
        match (r.name.as_str(), r.classification) {
            (PROBABILITIES, Some(k)) if !(1..=classes).contains(&k) => {
                return Err(ApiError::InvalidRequest(format!(
                    "classification must be in 1..={classes}, got {k}"
                )))
            }
            (FEATURES, Some(_)) => {
                return Err(ApiError::InvalidRequest(format!(
                    "classification applies to `{PROBABILITIES}` only"
                )))
            }
            (PROBABILITIES | FEATURES, _) => {}
            (name, _) => {
                return Err(ApiError::InvalidRequest(format!(
                    "unknown output `{name}`: the model has `{PROBABILITIES}` and `{FEATURES}`"
                )))
            }
        }
    }
    let wants = |name: &str| requested.iter().any(|r| r.name == name);
    let task = Task::Tensors { probabilities: wants(PROBABILITIES), features: wants(FEATURES) };
    Ok((requested, task))
}

/// One output tensor of a response.
pub struct Output {
    pub name: String,
    pub shape: Vec<i64>,
    pub data: OutputData,
    pub binary: Option<bool>,
}

pub enum OutputData {
    Fp32(Vec<f32>),
    /// Classification strings.
    Bytes(Vec<String>),
}

impl OutputData {
    pub fn datatype(&self) -> &'static str {
        match self {
            Self::Fp32(_) => "FP32",
            Self::Bytes(_) => "BYTES",
        }
    }

    /// The binary form: little-endian floats, or length-prefixed strings.
    pub fn to_raw(&self) -> Vec<u8> {
        match self {
            Self::Fp32(values) => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Self::Bytes(strings) => strings
                .iter()
                .flat_map(|s| (s.len() as u32).to_le_bytes().into_iter().chain(s.bytes()))
                .collect(),
        }
    }
}

/// The worker's answers as the requested output tensors, in the order requested.
pub fn outputs(
    state: &AppState,
    requested: Vec<Requested>,
    inferred: &mut Inferred,
) -> Result<Vec<Output>, ApiError> {
    let n = inferred.outcomes.len();
    let mut probabilities = Vec::with_capacity(n);
    let mut features = Vec::with_capacity(n);
    for outcome in std::mem::take(&mut inferred.outcomes) {
        let (p, f) = outcome
            .tensors()
            .ok_or_else(|| ApiError::Internal("the worker answered another task".into()))?;
        probabilities.extend(p);
        features.extend(f);
    }
    let classifier = &state.classifier;
    requested
        .into_iter()
        .map(|r| {
            let rows = if r.name == PROBABILITIES { &probabilities } else { &features };
            let width = rows.first().map_or(0, Vec::len);
            let (shape, data) = match r.classification {
                Some(k) => {
                    let strings = rows
                        .iter()
                        .flat_map(|row| classifier.top_k(row, k))
                        .map(|p| format!("{}:{}:{}", p.score, p.class_index, p.label))
                        .collect();
                    (vec![n as i64, k as i64], OutputData::Bytes(strings))
                }
                None => (vec![n as i64, width as i64], OutputData::Fp32(rows.concat())),
            };
            Ok(Output { name: r.name, shape, data, binary: r.binary })
        })
        .collect()
}

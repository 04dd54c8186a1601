//! The bitsandbytes 4-bit checkpoint format as transformers saves it
//! (`bitsandbytes/functional.py` `QuantState.as_dict(packed=True)` / `from_dict`,
//! `pack_dict_to_tensor`; transformers `quantizers/quantizer_bnb_4bit.py`,
//! `utils/quantization_config.py` `BitsAndBytesConfig`).
//!
//! A quantized Linear `P` is stored as `P.weight` (uint8 `[ceil(n/2), 1]`, two codes per
//! byte), `P.weight.absmax` (f32 per block, or uint8 codes with double quant),
//! `P.weight.quant_map` (f32 `[16]`), with double quant `P.weight.nested_absmax` (f32) and
//! `P.weight.nested_quant_map` (f32 `[256]`), and `P.weight.quant_state.bitsandbytes__nf4`:
//! the remaining fields as `json.dumps` text in a uint8 tensor.

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

use super::double_quant::{
    dequantize_absmax, dynamic_map_signed, quantize_absmax, NESTED_BLOCKSIZE,
};
use super::nf4::{dequantize_nf4, quantize_nf4, NF4_CODE};
use super::QuantError;

/// The suffix of the packed quant-state blob key, after the weight key.
pub const BLOB_SUFFIX: &str = ".quant_state.bitsandbytes__nf4";

/// Blocksizes bitsandbytes accepts for 4-bit quantization.
const VALID_BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// One tensor ready for a safetensors file.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    /// Full checkpoint key.
    pub key: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape as stored.
    pub shape: Vec<usize>,
    /// Little-endian bytes.
    pub data: Vec<u8>,
}

/// The non-tensor fields of a `QuantState` (the JSON blob).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantStateBlob {
    /// Always `nf4` here.
    pub quant_type: String,
    /// Elements per absmax.
    pub blocksize: usize,
    /// Torch dtype name of the original weight (`float32`, `bfloat16`, `float16`).
    pub dtype: String,
    /// Shape of the original weight.
    pub shape: Vec<usize>,
    /// Double-quant fields, when present.
    pub nested: Option<NestedBlob>,
}

/// The double-quant part of the blob.
#[derive(Debug, Clone, PartialEq)]
pub struct NestedBlob {
    /// Absmax values per nested block (256).
    pub blocksize: usize,
    /// Torch dtype name of the nested absmax (`float32`).
    pub dtype: String,
    /// The subtracted mean; bitsandbytes writes the f32 value widened to a Python float.
    pub offset: f32,
}

/// Formats an f64 as Python's `repr(float)` (what `json.dumps` writes): shortest round-trip
/// digits, fixed notation for decimal exponents in [-4, 16), else `d.ddde-XX`.
fn python_float_repr(x: f64) -> String {
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let sci = format!("{x:e}"); // e.g. "-1.2647561728954315e-1"
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let s = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if (point as usize) >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!(
                "{}.{}",
                &digits[..point as usize],
                &digits[point as usize..]
            )
        };
        format!("{sign}{s}")
    } else {
        let frac = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits.clone()
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{frac}e{esign}{:02}", exp.abs())
    }
}

impl QuantStateBlob {
    /// The blob bytes exactly as `json.dumps` writes them in `QuantState.as_dict`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let shape = self
            .shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let mut s = format!(
            "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
            self.quant_type, self.blocksize, self.dtype, shape
        );
        if let Some(n) = &self.nested {
            s.push_str(&format!(
                ", \"nested_blocksize\": {}, \"nested_dtype\": \"{}\", \"nested_offset\": {}",
                n.blocksize,
                n.dtype,
                python_float_repr(n.offset as f64)
            ));
        }
        s.push('}');
        s.into_bytes()
    }

    /// Parses and validates a blob; `key` names the tensor in errors.
    ///
    /// # Errors
    /// [`QuantError::Blob`] when it is not UTF-8 JSON, lacks a field, has a field of the wrong
    /// type, an unknown field, a quant type other than nf4, or an invalid blocksize or dtype.
    pub fn parse(key: &str, bytes: &[u8]) -> Result<Self, QuantError> {
        let bad = |reason: String| QuantError::Blob {
            key: key.to_string(),
            reason,
        };
        let v: Value = serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| bad("not a JSON object".into()))?;
        const KNOWN: [&str; 7] = [
            "quant_type",
            "blocksize",
            "dtype",
            "shape",
            "nested_blocksize",
            "nested_dtype",
            "nested_offset",
        ];
        if let Some(k) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(bad(format!("unknown field `{k}`")));
        }
        let str_field = |f: &str| -> Result<String, QuantError> {
            obj.get(f)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| bad(format!("field `{f}` missing or not a string")))
        };
        let uint_field = |f: &str| -> Result<usize, QuantError> {
            obj.get(f)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| bad(format!("field `{f}` missing or not an unsigned integer")))
        };
        let quant_type = str_field("quant_type")?;
        if quant_type != "nf4" {
            return Err(bad(format!(
                "quant_type `{quant_type}`, only nf4 is supported"
            )));
        }
        let blocksize = uint_field("blocksize")?;
        if !VALID_BLOCKSIZES.contains(&blocksize) {
            return Err(bad(format!(
                "blocksize {blocksize} is not one bitsandbytes uses"
            )));
        }
        let dtype = str_field("dtype")?;
        if !["float32", "bfloat16", "float16"].contains(&dtype.as_str()) {
            return Err(bad(format!("dtype `{dtype}` is not a float type")));
        }
        let shape = obj
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
            .ok_or_else(|| bad("field `shape` missing or not a list of sizes".into()))?;
        let has_nested = obj.keys().any(|k| k.starts_with("nested_"));
        let nested = if has_nested {
            let nbs = uint_field("nested_blocksize")?;
            if nbs == 0 {
                return Err(bad("nested_blocksize is 0".into()));
            }
            let offset = obj
                .get("nested_offset")
                .and_then(Value::as_f64)
                .ok_or_else(|| bad("field `nested_offset` missing or not a number".into()))?;
            Some(NestedBlob {
                blocksize: nbs,
                dtype: str_field("nested_dtype")?,
                // The value is an f32 widened by Python; narrowing recovers it exactly.
                offset: offset as f32,
            })
        } else {
            None
        };
        Ok(Self {
            quant_type,
            blocksize,
            dtype,
            shape,
            nested,
        })
    }
}

/// The absmax of an NF4 tensor, plain or double-quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 per block.
    Plain(Vec<f32>),
    /// 8-bit codes with their own scales and offset.
    Nested {
        /// One code per NF4 block.
        codes: Vec<u8>,
        /// One f32 per block of `blocksize` codes.
        nested_absmax: Vec<f32>,
        /// The 256-value map the codes index.
        nested_code: Box<[f32; 256]>,
        /// Mean added back after dequantizing.
        offset: f32,
        /// Codes per nested block.
        blocksize: usize,
    },
}

/// One NF4-quantized weight with everything needed to serialize or dequantize it.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    /// Shape of the original weight (`[out_features, in_features]` for a Linear).
    pub shape: Vec<usize>,
    /// Torch dtype name of the original weight.
    pub dtype: String,
    /// Elements per absmax.
    pub blocksize: usize,
    /// Two codes per byte, `ceil(numel / 2)` bytes.
    pub packed: Vec<u8>,
    /// The block scales.
    pub absmax: Absmax,
    /// The 16 code values (`quant_map`).
    pub quant_map: [f32; 16],
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn dtype_name(d: Dtype) -> String {
    format!("{d:?}")
}

impl Nf4Tensor {
    /// Quantizes a weight given as f32 values in row-major order.
    ///
    /// # Errors
    /// [`QuantError::Invalid`] when the tensor is empty, `shape` does not match the values, or
    /// the blocksize is not one bitsandbytes uses.
    pub fn quantize(
        key: &str,
        values: &[f32],
        shape: &[usize],
        dtype: &str,
        blocksize: usize,
        double_quant: bool,
    ) -> Result<Self, QuantError> {
        let invalid = |reason: String| QuantError::Invalid {
            key: key.to_string(),
            reason,
        };
        if values.is_empty() {
            return Err(invalid("cannot quantize an empty tensor".into()));
        }
        if shape.iter().product::<usize>() != values.len() {
            return Err(invalid(format!(
                "shape {shape:?} does not hold {} values",
                values.len()
            )));
        }
        if !VALID_BLOCKSIZES.contains(&blocksize) {
            return Err(invalid(format!("blocksize {blocksize} is not supported")));
        }
        let q = quantize_nf4(values, blocksize);
        let absmax = if double_quant {
            let n = quantize_absmax(&q.absmax);
            Absmax::Nested {
                codes: n.codes,
                nested_absmax: n.nested_absmax,
                nested_code: Box::new(dynamic_map_signed()),
                offset: n.offset,
                blocksize: NESTED_BLOCKSIZE,
            }
        } else {
            Absmax::Plain(q.absmax)
        };
        Ok(Self {
            shape: shape.to_vec(),
            dtype: dtype.to_string(),
            blocksize,
            packed: q.packed,
            absmax,
            quant_map: NF4_CODE,
        })
    }

    /// Number of weight elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The f32 absmax per block (after undoing double quant, as `dequantize_4bit` does).
    pub fn absmax_f32(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::Plain(a) => a.clone(),
            Absmax::Nested {
                codes,
                nested_absmax,
                nested_code,
                offset,
                blocksize,
            } => dequantize_absmax(codes, nested_absmax, nested_code, *offset, *blocksize),
        }
    }

    /// The dequantized weight in row-major order (f32, as `dequantize_4bit` on an f32 model).
    pub fn dequantize(&self) -> Vec<f32> {
        dequantize_nf4(
            &self.packed,
            &self.absmax_f32(),
            self.numel(),
            self.blocksize,
        )
    }

    /// The JSON blob of this tensor.
    pub fn blob(&self) -> QuantStateBlob {
        QuantStateBlob {
            quant_type: "nf4".into(),
            blocksize: self.blocksize,
            dtype: self.dtype.clone(),
            shape: self.shape.clone(),
            nested: match &self.absmax {
                Absmax::Plain(_) => None,
                Absmax::Nested {
                    offset, blocksize, ..
                } => Some(NestedBlob {
                    blocksize: *blocksize,
                    dtype: "float32".into(),
                    offset: *offset,
                }),
            },
        }
    }

    /// The checkpoint tensors for the weight stored under `weight_key` (e.g.
    /// `model.layers.0.mlp.up_proj.weight`), in bitsandbytes' layout.
    pub fn to_tensors(&self, weight_key: &str) -> Vec<RawTensor> {
        let t = |suffix: &str, dtype, shape: Vec<usize>, data| RawTensor {
            key: format!("{weight_key}{suffix}"),
            dtype,
            shape,
            data,
        };
        let mut out = vec![t(
            "",
            Dtype::U8,
            vec![self.packed.len(), 1],
            self.packed.clone(),
        )];
        match &self.absmax {
            Absmax::Plain(a) => out.push(t(".absmax", Dtype::F32, vec![a.len()], f32_bytes(a))),
            Absmax::Nested {
                codes,
                nested_absmax,
                nested_code,
                ..
            } => {
                out.push(t(".absmax", Dtype::U8, vec![codes.len()], codes.clone()));
                out.push(t(
                    ".nested_absmax",
                    Dtype::F32,
                    vec![nested_absmax.len()],
                    f32_bytes(nested_absmax),
                ));
                out.push(t(
                    ".nested_quant_map",
                    Dtype::F32,
                    vec![256],
                    f32_bytes(&nested_code[..]),
                ));
            }
        }
        out.push(t(
            ".quant_map",
            Dtype::F32,
            vec![16],
            f32_bytes(&self.quant_map),
        ));
        let blob = self.blob().to_bytes();
        out.push(t(BLOB_SUFFIX, Dtype::U8, vec![blob.len()], blob));
        out
    }

    /// Reads and validates the tensors of one 4-bit weight; `get` looks a key up in the
    /// checkpoint.
    ///
    /// # Errors
    /// A missing tensor, a wrong dtype or length (each naming the tensor), or a corrupt blob.
    pub fn from_tensors<'a>(
        weight_key: &str,
        get: impl Fn(&str) -> Option<TensorView<'a>>,
    ) -> Result<Self, QuantError> {
        let fetch = |suffix: &str| {
            let key = format!("{weight_key}{suffix}");
            get(&key)
                .map(|v| (key.clone(), v))
                .ok_or(QuantError::Missing { key })
        };
        let expect_dtype = |key: &str, v: &TensorView<'_>, want: Dtype, name: &'static str| {
            if v.dtype() == want {
                Ok(())
            } else {
                Err(QuantError::Dtype {
                    key: key.to_string(),
                    found: dtype_name(v.dtype()),
                    expected: name,
                })
            }
        };
        let expect_len = |key: &str, v: &TensorView<'_>, len: usize| {
            if v.shape().iter().product::<usize>() == len {
                Ok(())
            } else {
                Err(QuantError::Shape {
                    key: key.to_string(),
                    found: v.shape().to_vec(),
                    expected: format!("{len} elements"),
                })
            }
        };
        let f32s = |v: &TensorView<'_>| -> Vec<f32> {
            v.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };

        let (blob_key, blob_view) = fetch(BLOB_SUFFIX)?;
        expect_dtype(&blob_key, &blob_view, Dtype::U8, "U8")?;
        let blob = QuantStateBlob::parse(&blob_key, blob_view.data())?;
        let numel: usize = blob.shape.iter().product();
        if numel == 0 {
            return Err(QuantError::Blob {
                key: blob_key,
                reason: format!("shape {:?} has no elements", blob.shape),
            });
        }
        let n_blocks = numel.div_ceil(blob.blocksize);

        let (wkey, wv) = fetch("")?;
        expect_dtype(&wkey, &wv, Dtype::U8, "U8 (packed 4-bit codes)")?;
        expect_len(&wkey, &wv, numel.div_ceil(2))?;

        let (qkey, qv) = fetch(".quant_map")?;
        expect_dtype(&qkey, &qv, Dtype::F32, "F32")?;
        expect_len(&qkey, &qv, 16)?;
        let mut quant_map = [0f32; 16];
        quant_map.copy_from_slice(&f32s(&qv));

        let (akey, av) = fetch(".absmax")?;
        expect_len(&akey, &av, n_blocks)?;
        let absmax = match &blob.nested {
            None => {
                expect_dtype(
                    &akey,
                    &av,
                    Dtype::F32,
                    "F32 (no double quant in quant_state)",
                )?;
                Absmax::Plain(f32s(&av))
            }
            Some(n) => {
                expect_dtype(&akey, &av, Dtype::U8, "U8 (double-quantized absmax)")?;
                let (nkey, nv) = fetch(".nested_absmax")?;
                expect_dtype(&nkey, &nv, Dtype::F32, "F32")?;
                expect_len(&nkey, &nv, n_blocks.div_ceil(n.blocksize))?;
                let (mkey, mv) = fetch(".nested_quant_map")?;
                expect_dtype(&mkey, &mv, Dtype::F32, "F32")?;
                expect_len(&mkey, &mv, 256)?;
                let mut nested_code = Box::new([0f32; 256]);
                nested_code.copy_from_slice(&f32s(&mv));
                Absmax::Nested {
                    codes: av.data().to_vec(),
                    nested_absmax: f32s(&nv),
                    nested_code,
                    offset: n.offset,
                    blocksize: n.blocksize,
                }
            }
        };
        Ok(Self {
            shape: blob.shape,
            dtype: blob.dtype,
            blocksize: blob.blocksize,
            packed: wv.data().to_vec(),
            absmax,
            quant_map,
        })
    }
}

/// The `quantization_config` entry of config.json as transformers' `BitsAndBytesConfig`
/// writes it for NF4 with double quant (keys sorted, as `to_json_string(sort_keys=True)`).
pub fn quantization_config(compute_dtype: &str, skip_modules: &[String]) -> Value {
    json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": true,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes"
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::fixture;
    use safetensors::SafeTensors;

    const NAMES: [&str; 3] = ["w33x70", "w64x128", "w96x200"];

    fn fixture_bytes() -> Vec<u8> {
        std::fs::read(fixture("qwen2_5_vl_tiny/nf4/nf4_tensors.safetensors")).unwrap()
    }

    fn f32_of(st: &SafeTensors<'_>, key: &str) -> Vec<f32> {
        st.tensor(key)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// Maps the fixture's `<name>.state.<part>` keys onto the checkpoint layout
    /// `<name>.packed<.part>` that [`Nf4Tensor::from_tensors`] reads.
    fn fixture_key(name: &str, checkpoint_key: &str) -> String {
        let part = checkpoint_key
            .strip_prefix(&format!("{name}.packed"))
            .unwrap();
        if part.is_empty() {
            format!("{name}.packed")
        } else {
            format!("{name}.state{part}")
        }
    }

    #[test]
    fn quantizing_every_fixture_input_is_bit_identical_to_bitsandbytes() {
        let bytes = fixture_bytes();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for name in NAMES {
            for dq in [false, true] {
                let tag = format!("{name}_{}", if dq { "dq" } else { "plain" });
                let input = st.tensor(&format!("{tag}.input")).unwrap();
                let values = f32_of(&st, &format!("{tag}.input"));
                let q =
                    Nf4Tensor::quantize(&tag, &values, input.shape(), "float32", 64, dq).unwrap();
                let ours = q.to_tensors(&format!("{tag}.packed"));
                assert_eq!(ours.len(), if dq { 6 } else { 4 }, "{tag}: tensor count");
                for t in &ours {
                    let want = st.tensor(&fixture_key(&tag, &t.key)).unwrap();
                    assert_eq!(t.dtype, want.dtype(), "{}: dtype", t.key);
                    assert_eq!(t.shape, want.shape(), "{}: shape", t.key);
                    assert!(t.data == want.data(), "{}: bytes differ", t.key);
                }
                let dequant = q.dequantize();
                let want = f32_of(&st, &format!("{tag}.dequant"));
                assert!(
                    dequant
                        .iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{tag}: dequant differs"
                );
            }
        }
    }

    #[test]
    fn fixture_tensors_parse_and_dequantize_to_the_reference() {
        let bytes = fixture_bytes();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for name in NAMES {
            for tag in [format!("{name}_plain"), format!("{name}_dq")] {
                let wk = format!("{tag}.packed");
                let q = Nf4Tensor::from_tensors(&wk, |k| st.tensor(&fixture_key(&tag, k)).ok())
                    .unwrap();
                let want = f32_of(&st, &format!("{tag}.dequant"));
                assert_eq!(q.dequantize(), want, "{tag}");
            }
        }
    }

    #[test]
    fn quant_state_blobs_round_trip_byte_identically() {
        let bytes = fixture_bytes();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let nf4_model = std::fs::read(fixture("qwen2_5_vl_tiny/nf4/model.safetensors")).unwrap();
        let model = SafeTensors::deserialize(&nf4_model).unwrap();
        let mut n = 0;
        for (key, view) in st.tensors().into_iter().chain(model.tensors()) {
            if key.ends_with("bitsandbytes__nf4") {
                let blob = QuantStateBlob::parse(&key, view.data()).unwrap();
                assert_eq!(blob.to_bytes(), view.data(), "{key}");
                n += 1;
            }
        }
        assert_eq!(n, 6 + 36, "six fixture tensors and 36 quantized Linears");
    }

    #[test]
    fn python_float_repr_matches_pythons_rules() {
        assert_eq!(
            python_float_repr(0.12647561728954315),
            "0.12647561728954315"
        );
        assert_eq!(python_float_repr(1e-5), "1e-05");
        assert_eq!(python_float_repr(0.0001), "0.0001");
        assert_eq!(python_float_repr(1.0), "1.0");
        assert_eq!(python_float_repr(-2.5e20), "-2.5e+20");
        assert_eq!(python_float_repr(123.25), "123.25");
        assert_eq!(python_float_repr(1e16), "1e+16");
    }

    fn with_replaced<'a>(
        st: &'a SafeTensors<'a>,
        tag: &'a str,
        replace_key: &'a str,
        replacement: &'a TensorView<'a>,
    ) -> impl Fn(&str) -> Option<TensorView<'a>> + 'a {
        move |k: &str| {
            if k == replace_key {
                Some(replacement.clone())
            } else {
                st.tensor(&fixture_key(tag, k)).ok()
            }
        }
    }

    #[test]
    fn a_corrupt_blob_is_rejected_naming_the_tensor() {
        let bytes = fixture_bytes();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let tag = "w33x70_dq";
        let blob_key = format!("{tag}.packed{BLOB_SUFFIX}");
        for bad in [
            &b"{\"quant_type\": \"nf4\", \"blocksize\": 64"[..],
            &b"{\"quant_type\": \"fp4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [33, 70]}"[..],
            &b"{\"quant_type\": \"nf4\", \"blocksize\": 63, \"dtype\": \"float32\", \"shape\": [33, 70]}"[..],
            &b"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [33, 70], \"nested_blocksize\": 256}"[..],
        ] {
            let view = TensorView::new(Dtype::U8, vec![bad.len()], bad).unwrap();
            let err = Nf4Tensor::from_tensors(
                &format!("{tag}.packed"),
                with_replaced(&st, tag, &blob_key, &view),
            )
            .unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, QuantError::Blob { .. }), "{msg}");
            assert!(msg.contains(&blob_key), "{msg}");
        }
    }

    #[test]
    fn an_absmax_of_the_wrong_length_is_rejected_naming_the_tensor() {
        let bytes = fixture_bytes();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let tag = "w33x70_plain";
        let key = format!("{tag}.packed.absmax");
        let short = vec![0u8; 36 * 4];
        let view = TensorView::new(Dtype::F32, vec![36], &short).unwrap();
        let err = Nf4Tensor::from_tensors(
            &format!("{tag}.packed"),
            with_replaced(&st, tag, &key, &view),
        )
        .unwrap_err();
        assert!(matches!(err, QuantError::Shape { .. }), "{err}");
        assert!(
            err.to_string().contains(&key) && err.to_string().contains("37"),
            "{err}"
        );
    }

    #[test]
    fn an_integer_weight_is_rejected_naming_the_tensor() {
        let bytes = fixture_bytes();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let tag = "w33x70_plain";
        let key = format!("{tag}.packed");
        let ints = vec![0u8; 1155 * 4];
        let view = TensorView::new(Dtype::I32, vec![1155, 1], &ints).unwrap();
        let err = Nf4Tensor::from_tensors(&key, with_replaced(&st, tag, &key, &view)).unwrap_err();
        assert!(matches!(err, QuantError::Dtype { .. }), "{err}");
        assert!(
            err.to_string().contains(&key) && err.to_string().contains("I32"),
            "{err}"
        );
    }

    #[test]
    fn quantization_config_agrees_with_the_fixture_on_every_key_it_has() {
        let cfg: Value = serde_json::from_slice(
            &std::fs::read(fixture("qwen2_5_vl_tiny/nf4/config.json")).unwrap(),
        )
        .unwrap();
        let ours = quantization_config("float32", &["lm_head".to_string()]);
        for (k, v) in cfg["quantization_config"].as_object().unwrap() {
            assert_eq!(&ours[k], v, "{k}");
        }
    }
}

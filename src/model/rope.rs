//! Multimodal rotary position embedding (M-RoPE) of the Qwen2.5-VL decoder.
//!
//! Follows transformers `models/qwen2_5_vl/modeling_qwen2_5_vl.py@00b676f8f0489b88652a31d70751cc540dd06305`:
//! `Qwen2_5_VLModel.get_rope_index` (3-D position ids: text tokens advance all three
//! axes together; an image's tokens get temporal 0 (images have no time step), height
//! and width of their merged-patch grid, offset by the text before them; text after an
//! image continues at the image's max position + 1; left padding gets position 1),
//! `Qwen2_5_VLRotaryEmbedding` and `apply_multimodal_rotary_pos_emb` (frequency pair `j`
//! takes its position from the axis whose `mrope_section` covers `j`; `rotate_half`).

use burn::prelude::*;
use burn::tensor::{DType, TensorData};

use crate::kernels::Kernels;
use crate::model::config::{Qwen25VlConfig, TextConfig};
use crate::model::error::ModelError;

/// 3-D position ids of a (padded) batch and each row's decode offset.
#[derive(Debug, Clone, PartialEq)]
pub struct MropePositions {
    /// `[3, batch, seq]` row-major: temporal, height, width.
    pub ids: Vec<i64>,
    /// Rows.
    pub batch: usize,
    /// Columns (padded length).
    pub seq: usize,
    /// Per row: `max position + 1 - seq`; decode step at cache index `c` uses `c + delta`.
    pub deltas: Vec<i64>,
}

/// Computes M-RoPE position ids like transformers' `get_rope_index`.
///
/// `rows` are equal-length token rows; `valid[b][i]` is false for padding; `grids` are
/// the `(t, h, w)` patch grids of all images of the batch in order of appearance.
///
/// # Errors
/// [`ModelError::Input`] when an image span runs past its row, a video placeholder is
/// found (not supported), or there are fewer grids than images.
pub fn position_ids(
    rows: &[Vec<u32>],
    valid: &[Vec<bool>],
    grids: &[[usize; 3]],
    cfg: &Qwen25VlConfig,
) -> Result<MropePositions, ModelError> {
    let batch = rows.len();
    let seq = rows.first().map_or(0, Vec::len);
    if valid.len() != batch {
        return Err(ModelError::Input {
            name: "attention_mask",
            reason: format!("{} mask rows for {batch} token rows", valid.len()),
        });
    }
    let merge = cfg.vision.spatial_merge_size;
    let tok = &cfg.tokens;
    let mut ids = vec![1i64; 3 * batch * seq];
    let mut deltas = Vec::with_capacity(batch);
    let mut next_image = 0usize;
    for (b, row) in rows.iter().enumerate() {
        if row.len() != seq || valid[b].len() != seq {
            return Err(ModelError::Input {
                name: "input_ids",
                reason: format!(
                    "row {b} has {} tokens / {} mask entries, expected {seq}",
                    row.len(),
                    valid[b].len()
                ),
            });
        }
        let tokens: Vec<u32> = row
            .iter()
            .zip(&valid[b])
            .filter(|(_, &v)| v)
            .map(|(&t, _)| t)
            .collect();
        let mut images = 0;
        for w in tokens.windows(2) {
            if w[0] == tok.vision_start_token_id {
                if Some(w[1]) == tok.video_token_id {
                    return Err(ModelError::Input {
                        name: "input_ids",
                        reason: format!("row {b} holds a video; only images are supported"),
                    });
                }
                if w[1] == tok.image_token_id {
                    images += 1;
                }
            }
        }
        let mut pos: [Vec<i64>; 3] = Default::default();
        let mut st = 0usize;
        let mut next_start = 0i64;
        for _ in 0..images {
            let ed = tokens[st..]
                .iter()
                .position(|&t| t == tok.image_token_id)
                .map(|p| st + p)
                .ok_or_else(|| ModelError::Input {
                    name: "input_ids",
                    reason: format!("row {b}: vision start without image tokens"),
                })?;
            let [t, h, w] = *grids.get(next_image).ok_or_else(|| ModelError::Input {
                name: "image_grid_thw",
                reason: format!("{} grids for more images in input_ids", grids.len()),
            })?;
            next_image += 1;
            let (lh, lw) = (h / merge, w / merge);
            for i in 0..(ed - st) as i64 {
                for p in pos.iter_mut() {
                    p.push(next_start + i);
                }
            }
            let base = next_start + (ed - st) as i64;
            // Images: temporal index is frame * second_per_grid_t(=0) * tokens_per_second = 0.
            for _f in 0..t {
                for y in 0..lh {
                    for x in 0..lw {
                        pos[0].push(base);
                        pos[1].push(base + y as i64);
                        pos[2].push(base + x as i64);
                    }
                }
            }
            let n = t * lh * lw;
            st = ed + n;
            if st > tokens.len() {
                return Err(ModelError::Input {
                    name: "input_ids",
                    reason: format!(
                        "row {b}: image of grid {t}x{h}x{w} needs {n} tokens from index {ed}, row has {}",
                        tokens.len()
                    ),
                });
            }
            next_start = pos.iter().flat_map(|p| p.iter()).max().map_or(0, |m| m + 1);
        }
        if st < tokens.len() {
            for i in 0..(tokens.len() - st) as i64 {
                for p in pos.iter_mut() {
                    p.push(next_start + i);
                }
            }
        }
        let max = pos
            .iter()
            .flat_map(|p| p.iter())
            .copied()
            .max()
            .unwrap_or(0);
        deltas.push(max + 1 - seq as i64);
        for (a, p) in pos.iter().enumerate() {
            let mut it = p.iter();
            for (i, &v) in valid[b].iter().enumerate() {
                if v {
                    if let Some(&x) = it.next() {
                        ids[(a * batch + b) * seq + i] = x;
                    }
                }
            }
        }
    }
    Ok(MropePositions {
        ids,
        batch,
        seq,
        deltas,
    })
}

/// Cos/sin tables for one forward call, already split by M-RoPE section.
#[derive(Debug, Clone)]
pub struct RopeTables<B: Kernels> {
    /// `[batch, 1, seq, head_dim]`
    pub cos: Tensor<B, 4>,
    /// `[batch, 1, seq, head_dim]`
    pub sin: Tensor<B, 4>,
}

impl<B: Kernels> RopeTables<B> {
    /// Tables for position ids `ids` laid out `[3, batch, seq]` (`shape` = `[batch, seq]`),
    /// computed in f32 (as the reference does, whatever the activation dtype) and cast to
    /// `dtype`.
    pub fn new(
        cfg: &TextConfig,
        ids: &[i64],
        shape: [usize; 2],
        dtype: DType,
        device: &B::Device,
    ) -> Self {
        let [batch, seq] = shape;
        let half = cfg.head_dim / 2;
        let f32_ = (device, DType::F32);
        let pos: Vec<f32> = ids.iter().map(|&p| p as f32).collect();
        let pos: Tensor<B, 3> = Tensor::from_data(TensorData::new(pos, [3, batch, seq]), f32_);
        let mut freqs: Option<Tensor<B, 3>> = None;
        let mut start = 0;
        for (axis, &len) in cfg.mrope_section.iter().enumerate() {
            // inv_freq of this axis' section, zero elsewhere: summing the three axes
            // then gives each frequency pair exactly its own axis' angle.
            let inv: Vec<f32> = (0..half)
                .map(|j| {
                    if (start..start + len).contains(&j) {
                        (1.0 / cfg.rope_theta.powf((2 * j) as f64 / cfg.head_dim as f64)) as f32
                    } else {
                        0.0
                    }
                })
                .collect();
            start += len;
            let inv: Tensor<B, 3> =
                Tensor::<B, 1>::from_data(TensorData::new(inv, [half]), f32_).reshape([1, 1, half]);
            let p = pos.clone().narrow(0, axis, 1).reshape([batch, seq, 1]);
            let f = p * inv; // [batch, seq, half]
            freqs = Some(match freqs {
                None => f,
                Some(acc) => acc + f,
            });
        }
        let freqs = freqs.unwrap_or_else(|| Tensor::zeros([batch, seq, half], f32_));
        let emb = Tensor::cat(vec![freqs.clone(), freqs], 2); // [batch, seq, head_dim]
        RopeTables {
            cos: emb.clone().cos().cast(dtype).unsqueeze_dim(1),
            sin: emb.sin().cast(dtype).unsqueeze_dim(1),
        }
    }
}

/// `[-x₂, x₁]` for `x = [x₁, x₂]` split in halves along the last dim.
pub(crate) fn rotate_half<B: Kernels, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let d = x.dims()[D - 1];
    let x1 = x.clone().narrow(D - 1, 0, d / 2);
    let x2 = x.narrow(D - 1, d / 2, d - d / 2);
    Tensor::cat(vec![x2.neg(), x1], D - 1)
}

/// `x·cos + rotate_half(x)·sin`, with `cos`/`sin` broadcast over the head dim.
///
/// # Shapes
/// - `x`: `[batch, heads, seq, head_dim]`; `cos`, `sin`: `[batch, 1, seq, head_dim]`
pub(crate) fn apply_rotary<B: Kernels>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Tensor<B, 4> {
    crate::kernels::rotary(x, cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::HfConfig;
    use crate::test_util::fixture;

    fn tiny() -> Qwen25VlConfig {
        HfConfig::from_dir(&fixture("qwen2_5_vl_tiny"))
            .unwrap()
            .resolve()
            .unwrap()
    }

    fn reference_ints(key: &str) -> (Vec<i64>, Vec<usize>) {
        let bytes = std::fs::read(fixture("qwen2_5_vl_tiny/reference.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor(key).unwrap();
        let v = t
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (v, t.shape().to_vec())
    }

    #[test]
    fn position_ids_equal_the_reference_exactly() {
        let cfg = tiny();
        let (ids, _) = reference_ints("input_ids");
        let (grid, _) = reference_ints("image_grid_thw");
        let (want, shape) = reference_ints("position_ids");
        assert_eq!(shape, vec![3, 1, ids.len()]);
        let row: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
        let n = row.len();
        let got = position_ids(
            &[row],
            &[vec![true; n]],
            &[[grid[0] as usize, grid[1] as usize, grid[2] as usize]],
            &cfg,
        )
        .unwrap();
        assert_eq!(got.ids, want);
    }

    #[test]
    fn left_padding_gives_pads_position_one_and_shifts_nothing_else() {
        let cfg = tiny();
        let alone = position_ids(&[vec![5, 6, 7]], &[vec![true; 3]], &[], &cfg).unwrap();
        let padded = position_ids(
            &[vec![0, 0, 5, 6, 7]],
            &[vec![false, false, true, true, true]],
            &[],
            &cfg,
        )
        .unwrap();
        assert_eq!(alone.ids, vec![0, 1, 2, 0, 1, 2, 0, 1, 2]);
        assert_eq!(
            padded.ids,
            vec![1, 1, 0, 1, 2, 1, 1, 0, 1, 2, 1, 1, 0, 1, 2]
        );
        // decode position = cache index + delta must agree: 3 + 0 == 5 + (-2)
        assert_eq!(alone.deltas[0] + 3, padded.deltas[0] + 5);
    }

    #[test]
    fn text_after_each_image_continues_from_the_image_max_position() {
        let cfg = tiny();
        let t = &cfg.tokens;
        let (vs, im, ve) = (t.vision_start_token_id, t.image_token_id, 1994);
        // T VS I I I I VE T VS I I I I VE T ; two 1x4x4 grids -> 2x2 merged tokens each
        let row = vec![5, vs, im, im, im, im, ve, 6, vs, im, im, im, im, ve, 7];
        let p = position_ids(&[row], &[vec![true; 15]], &[[1, 4, 4], [1, 4, 4]], &cfg).unwrap();
        let temporal = [0, 1, 2, 2, 2, 2, 4, 5, 6, 7, 7, 7, 7, 9, 10];
        let height = [0, 1, 2, 2, 3, 3, 4, 5, 6, 7, 7, 8, 8, 9, 10];
        let width = [0, 1, 2, 3, 2, 3, 4, 5, 6, 7, 8, 7, 8, 9, 10];
        let want: Vec<i64> = [temporal, height, width].concat();
        assert_eq!(p.ids, want);
        assert_eq!(p.deltas, vec![11 - 15]);
    }

    #[test]
    fn more_images_than_grids_is_an_input_error() {
        let cfg = tiny();
        let t = &cfg.tokens;
        let row = vec![t.vision_start_token_id, t.image_token_id, 5];
        let e = position_ids(&[row], &[vec![true; 3]], &[], &cfg).unwrap_err();
        assert!(e.to_string().contains("image_grid_thw"), "{e}");
    }

    #[test]
    fn rotate_half_negates_the_second_half_into_the_front() {
        let dev = Default::default();
        let x = Tensor::<crate::test_util::TB, 1>::from_floats([1.0, 2.0, 3.0, 4.0], &dev);
        let y = rotate_half(x).into_data().to_vec::<f32>().unwrap();
        assert_eq!(y, vec![-3.0, -4.0, 1.0, 2.0]);
    }
}

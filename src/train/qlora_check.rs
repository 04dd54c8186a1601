//! The QLoRA-step gradient check against peft (fixture `qwen2_5_vl_tiny/qlora_step/`, written
//! by `make_fixtures.py`: `get_peft_model(qm, LoraConfig(r=8, lora_alpha=16,
//! init_lora_weights=False))`, `loss = pm(**inp, labels=labels).loss; loss.backward()`).
//!
//! The fixture was computed on the NF4 model, so its loss and gradients are the bar only for
//! an NF4 base; this module computes the same quantities through our model for whatever base
//! it is given. Test-only: it reads the fixtures.

use std::collections::BTreeMap;

use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::TensorData;

use crate::kernels::AutodiffKernels;
use crate::model::lora::{Adapter, AdapterConfig, LoraWeights, Site, TARGET_MODULES};
use crate::model::qwen::tests::{image_on, reference};
use crate::model::Qwen25Vl;
use crate::test_util::fixture;
use crate::train::batch::counted_tokens;
use crate::train::config::Recompute;
use crate::train::loss::causal_lm_loss;
use crate::train::recompute::{AdBatch, Pass};

/// The fixture's step: LoRA `.before` weights as an adapter, the labels, and the loss torch
/// computed (on the NF4 model).
pub(crate) struct QloraStep {
    pub adapter: Adapter,
    /// `[1, 48]` labels, -100 before `answer_start`.
    pub labels: Vec<i64>,
    /// torch's loss (`step.json`).
    pub loss: f64,
    /// fixture key (`…lora_A.default.weight`) → torch's gradient.
    pub grads: BTreeMap<String, Vec<f32>>,
}

fn f32s(v: &safetensors::tensor::TensorView<'_>) -> Vec<f32> {
    v.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Reads `qlora_step/step.safetensors` and `step.json`.
pub(crate) fn load_step() -> QloraStep {
    let bytes = std::fs::read(fixture("qwen2_5_vl_tiny/qlora_step/step.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixture("qwen2_5_vl_tiny/qlora_step/step.json")).unwrap(),
    )
    .unwrap();
    let r = meta["r"].as_u64().unwrap() as usize;
    let alpha = meta["lora_alpha"].as_f64().unwrap();
    let mut pairs: BTreeMap<Site, LoraWeights> = BTreeMap::new();
    let mut grads = BTreeMap::new();
    for (name, view) in st.tensors() {
        if let Some(key) = name.strip_suffix(".grad") {
            grads.insert(key.to_string(), f32s(&view));
        }
        let Some(key) = name.strip_suffix(".before") else {
            continue;
        };
        let rest = key
            .strip_prefix("base_model.model.model.language_model.layers.")
            .unwrap();
        let (layer, rest) = rest.split_once('.').unwrap();
        let (module, which) = rest.split_once(".lora_").unwrap();
        let site = Site::new(layer.parse().unwrap(), module);
        let shape = [view.shape()[0], view.shape()[1]];
        let w = pairs.entry(site).or_insert_with(|| LoraWeights {
            a: vec![],
            a_shape: [0, 0],
            b: vec![],
            b_shape: [0, 0],
        });
        if which.starts_with('A') {
            (w.a, w.a_shape) = (f32s(&view), shape);
        } else {
            (w.b, w.b_shape) = (f32s(&view), shape);
        }
    }
    assert_eq!(pairs.len(), 2 * TARGET_MODULES.len());
    let labels = st
        .tensor("labels")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    QloraStep {
        adapter: Adapter {
            config: AdapterConfig::for_targets(r, alpha, 0.0, None),
            pairs,
        },
        labels,
        loss: meta["loss"].as_f64().unwrap(),
        grads,
    }
}

/// Attaches the fixture's `.before` LoRA weights to `model` (any base), runs the reference
/// inputs (image included) with the fixture's labels, and returns the masked causal-LM loss
/// and the gradient of every LoRA param, keyed as in `step.safetensors` (without `.grad`),
/// in key order. Compare against [`load_step`]'s `loss` and `grads` for an NF4 base.
pub(crate) fn qlora_step_check<B: AutodiffKernels>(
    model: Qwen25Vl<B>,
    dev: &B::Device,
) -> (f32, Vec<(String, Vec<f32>)>) {
    qlora_step_check_with(model, dev, Recompute::None)
}

/// [`qlora_step_check`] through the trainer's micro-batch pass with `recompute` (its
/// backward in segments) instead of one plain backward.
pub(crate) fn qlora_step_check_with<B: AutodiffKernels>(
    mut model: Qwen25Vl<B>,
    dev: &B::Device,
    recompute: Recompute,
) -> (f32, Vec<(String, Vec<f32>)>) {
    let step = load_step();
    let r = reference();
    model.attach_adapter(&step.adapter, dev).unwrap();
    let model = model.freeze_except_lora();
    let img = image_on::<B>(&r, dev);
    let n = step.labels.len();
    let counted = counted_tokens(&step.labels);
    let labels = Tensor::<B, 2, Int>::from_data(TensorData::new(step.labels, [1, n]), dev);
    let (value, gp) = if recompute == Recompute::None {
        let out = model
            .forward(std::slice::from_ref(&r.input_ids), None, Some(&img), dev)
            .unwrap();
        let (loss, _) = causal_lm_loss(out.logits, labels);
        let value = loss.clone().into_scalar().elem::<f32>();
        (value, GradientsParams::from_grads(loss.backward(), &model))
    } else {
        let pass = Pass {
            model: &model,
            device: dev,
            recompute,
            window_tokens: counted,
            loss_scale: None,
            concurrent: false,
        };
        let batch = AdBatch {
            ids: vec![r.input_ids.clone()],
            valid: vec![vec![true; n]],
            labels,
            images: Some(img),
        };
        let mut accum = burn::optim::GradientsAccumulator::<Qwen25Vl<B>>::new();
        let value = pass
            .run(batch, 0, &mut accum)
            .unwrap()
            .into_scalar()
            .elem::<f32>();
        (value, accum.grads())
    };
    let mut grads: Vec<(String, Vec<f32>)> = model
        .lora_params()
        .into_iter()
        .map(|(id, key)| {
            let g = gp
                .get::<B::InnerBackend, 2>(id)
                .map(|t| t.into_data().convert::<f32>().to_vec::<f32>().unwrap())
                .unwrap_or_default();
            // our key `….lora_A.weight` → the fixture's `….lora_A.default.weight`
            let key = key.replace(".lora_A.weight", ".lora_A.default.weight");
            let key = key.replace(".lora_B.weight", ".lora_B.default.weight");
            (key, g)
        })
        .collect();
    grads.sort_by(|a, b| a.0.cmp(&b.0));
    (value, grads)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TB;

    type AD = burn::backend::Autodiff<TB>;

    /// Central differences in f32 on a loss of ~7.6: rounding noise ~1e-6 over a change of
    /// 2·H·|grad| ≥ 3e-3, plus O(H²) curvature. Measured worst: 2.2e-4 relative; 5e-3 still
    /// catches a gradient off by a scaling factor or a transposed matrix.
    const FD_REL_TOL: f32 = 5e-3;
    /// Step for the finite differences.
    const H: f32 = 1e-2;

    /// The loss through the plain (non-autodiff) model with `adapter` attached.
    fn loss_with(adapter: &Adapter, labels: &[i64]) -> f32 {
        let dev = Default::default();
        let r = reference();
        let mut m = crate::model::qwen::tests::tiny();
        m.attach_adapter(adapter, &dev).unwrap();
        let img = crate::model::qwen::tests::image(&r);
        let out = m
            .forward(std::slice::from_ref(&r.input_ids), None, Some(&img), &dev)
            .unwrap();
        let n = labels.len();
        let labels =
            Tensor::<TB, 2, Int>::from_data(TensorData::new(labels.to_vec(), [1, n]), &dev);
        causal_lm_loss(out.logits, labels).0.into_scalar()
    }

    #[test]
    fn dense_step_check_gradients_agree_with_finite_differences_of_the_loss() {
        let m = Qwen25Vl::<AD>::load(&fixture("qwen2_5_vl_tiny"), &Default::default()).unwrap();
        let (loss, grads) = qlora_step_check(m, &Default::default());
        let step = load_step();
        let keys: Vec<&String> = grads.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, step.grads.keys().collect::<Vec<_>>());
        for (k, g) in &grads {
            assert_eq!(g.len(), step.grads[k].len(), "{k}");
        }
        assert!(
            (loss - loss_with(&step.adapter, &step.labels)).abs() < 1e-5,
            "autodiff and plain forward agree on the loss"
        );
        // The fixture needs the NF4 base: on the dense base the loss is 7.647 vs torch's 7.595
        // on NF4 (the vision tower is quantized there too), far outside any f32 tolerance.
        assert!(
            (f64::from(loss) - step.loss).abs() > 1e-2,
            "dense loss {loss} unexpectedly equals the NF4 fixture loss {}",
            step.loss
        );
        // The largest gradient entry of an A and a B matrix in each layer.
        for key in [
            "base_model.model.model.language_model.layers.0.self_attn.o_proj.lora_A.default.weight",
            "base_model.model.model.language_model.layers.0.mlp.up_proj.lora_B.default.weight",
            "base_model.model.model.language_model.layers.1.self_attn.v_proj.lora_A.default.weight",
            "base_model.model.model.language_model.layers.1.mlp.gate_proj.lora_B.default.weight",
        ] {
            let g = &grads.iter().find(|(k, _)| k == key).unwrap().1;
            let (at, &want) = g
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
                .unwrap();
            let rest = key
                .strip_prefix("base_model.model.model.language_model.layers.")
                .unwrap();
            let (layer, rest) = rest.split_once('.').unwrap();
            let (module, which) = rest.split_once(".lora_").unwrap();
            let site = Site::new(layer.parse().unwrap(), module);
            let nudged = |d: f32| {
                let mut a = step.adapter.clone();
                let w = a.pairs.get_mut(&site).unwrap();
                let v = if which.starts_with('A') {
                    &mut w.a
                } else {
                    &mut w.b
                };
                v[at] += d;
                loss_with(&a, &step.labels)
            };
            let fd = (nudged(H) - nudged(-H)) / (2.0 * H);
            assert!(
                (fd - want).abs() <= FD_REL_TOL * want.abs(),
                "{key}[{at}]: autodiff {want}, finite difference {fd}"
            );
        }
    }

    /// The loss is one f32 scalar from the same NF4 weights: the issue's bar is 1e-4 relative.
    const LOSS_REL_TOL: f64 = 1e-4;
    /// Gradients are compared relative to each tensor's norm (the issue's bar: 1e-3).
    const GRAD_REL_TOL: f32 = 1e-3;
    /// With the base in f16 the loss keeps the f32 bar (measured: 1.0e-5 relative).
    const F16_LOSS_REL_TOL: f64 = 1e-4;
    /// f16 keeps 11 significant bits through every op of the base; measured worst: 4.9e-3 of
    /// the tensor's norm (layer 0 q_proj lora_B). The bar is twice that.
    const F16_GRAD_REL_TOL: f32 = 1e-2;

    #[test]
    fn qlora_step_on_the_nf4_base_matches_peft_loss_and_gradients() {
        qlora_step_matches_peft::<AD>();
    }

    /// The same step on wgpu: NF4 dequantized by the CubeCL kernel through the fusion custom
    /// op, the backward through the seam's autodiff op.
    #[test]
    fn qlora_step_on_wgpu_matches_peft_loss_and_gradients() {
        if crate::test_util::wgpu_available("qlora_step_on_wgpu_matches_peft_loss_and_gradients") {
            qlora_step_matches_peft::<burn::backend::Autodiff<burn::backend::Wgpu>>();
        }
    }

    /// Half precision on wgpu (lavapipe in CI), with and without layer recomputation: the NF4
    /// base computes in f16 while the LoRA params, the loss and their gradients stay f32. On `WgpuDevice::Cpu` (lavapipe), since
    /// this process's `DefaultDevice` computes in f32 for the tests above.
    #[test]
    fn qlora_step_in_f16_on_wgpu_recomputed_or_not_stays_within_half_precision_of_peft() {
        use crate::device::{Device, Precision};
        type W = burn::backend::Autodiff<burn::backend::Wgpu>;
        if !crate::test_util::wgpu_available(
            "qlora_step_in_f16_on_wgpu_recomputed_or_not_stays_within_half_precision_of_peft",
        ) {
            return;
        }
        let dev = burn::backend::wgpu::WgpuDevice::Cpu;
        Precision::F16.apply::<W>(&dev, Device::Wgpu).unwrap();
        qlora_step_matches_peft_on::<W>(&dev, F16_LOSS_REL_TOL, F16_GRAD_REL_TOL);
        // And through the recomputing pass: the rerun segments compute in f16 too, and the
        // gradient handed between segments stays within the same tolerance.
        let layers: Recompute = "layers".parse().unwrap();
        qlora_step_matches_peft_with::<W>(&dev, F16_LOSS_REL_TOL, F16_GRAD_REL_TOL, layers);
    }

    /// Layer recomputation (the backward in one-layer segments) against the same peft step.
    #[test]
    fn qlora_step_with_recomputed_layers_matches_peft_on_the_cpu_and_on_wgpu() {
        let layers: Recompute = "layers".parse().unwrap();
        qlora_step_matches_peft_with::<AD>(&Default::default(), LOSS_REL_TOL, GRAD_REL_TOL, layers);
        if crate::test_util::wgpu_available(
            "qlora_step_with_recomputed_layers_matches_peft_on_the_cpu_and_on_wgpu",
        ) {
            type W = burn::backend::Autodiff<burn::backend::Wgpu>;
            qlora_step_matches_peft_with::<W>(
                &Default::default(),
                LOSS_REL_TOL,
                GRAD_REL_TOL,
                layers,
            );
        }
    }

    fn qlora_step_matches_peft<B: AutodiffKernels>() {
        qlora_step_matches_peft_on::<B>(&Default::default(), LOSS_REL_TOL, GRAD_REL_TOL);
    }

    fn qlora_step_matches_peft_on<B: AutodiffKernels>(
        dev: &B::Device,
        loss_tol: f64,
        grad_tol: f32,
    ) {
        qlora_step_matches_peft_with::<B>(dev, loss_tol, grad_tol, Recompute::None);
    }

    fn qlora_step_matches_peft_with<B: AutodiffKernels>(
        dev: &B::Device,
        loss_tol: f64,
        grad_tol: f32,
        recompute: Recompute,
    ) {
        let m = Qwen25Vl::<B>::load(&fixture("qwen2_5_vl_tiny/nf4"), dev).unwrap();
        let (loss, grads) = qlora_step_check_with(m, dev, recompute);
        let step = load_step();
        let rel = (f64::from(loss) - step.loss).abs() / step.loss.abs();
        assert!(
            rel <= loss_tol,
            "loss {loss} vs torch {} (rel {rel:e})",
            step.loss
        );
        assert_eq!(grads.len(), step.grads.len());
        for (k, g) in &grads {
            let want = &step.grads[k];
            let norm = want.iter().map(|x| x * x).sum::<f32>().sqrt();
            let diff = g
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f32>()
                .sqrt();
            assert!(
                diff <= grad_tol * norm,
                "{k}: |grad - torch| = {diff:e}, |torch| = {norm:e}"
            );
        }
    }
}

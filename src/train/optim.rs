//! AdamW as PyTorch's `torch.optim.AdamW` (decoupled weight decay, bias-corrected moments,
//! eps added after the square root), with optional clipping by the *global* gradient norm as
//! `torch.nn.utils.clip_grad_norm_` (burn's built-in clipping is per tensor).
//!
//! The optimizer works on any autodiff module: it visits the float params that received a
//! gradient, updates them on the inner backend, and keeps their moments keyed by `ParamId`
//! (create trainable params with stable ids so a resumed run finds its state).

use std::collections::HashMap;

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::DType;

/// AdamW hyper-parameters (PyTorch names and defaults except where the QLoRA recipe differs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip the global L2 norm of all gradients to this value (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
        }
    }
}

/// First and second moments of one parameter, flattened.
#[derive(Debug, Clone)]
pub struct Moments<B: Backend> {
    pub m: Tensor<B, 1>,
    pub v: Tensor<B, 1>,
}

/// AdamW state: step count and per-parameter moments on the inner (non-autodiff) backend.
#[derive(Debug)]
pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    /// Optimizer steps taken (the bias correction uses it).
    pub step: u64,
    pub moments: HashMap<ParamId, Moments<B>>,
}

/// What one step did, for training metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: f64,
    /// Factor the gradients were scaled by (1 when not clipped).
    pub clip_scale: f64,
}

impl<B: Backend> AdamW<B> {
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            step: 0,
            moments: HashMap::new(),
        }
    }

    /// Applies one AdamW step with learning rate `lr` to every float param of `module` that
    /// has a gradient in `grads`; others are left untouched.
    pub fn step<AB, M>(&mut self, lr: f64, module: M, grads: GradientsParams) -> (M, StepStats)
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        self.step_unscaled(lr, module, grads, 1.0)
    }

    /// [`AdamW::step`] on gradients of a loss multiplied by `1 / unscale` (f16 loss scaling):
    /// they are multiplied by `unscale` first. Gradients with an inf or NaN are not applied:
    /// the module and the state come back unchanged, with a non-finite `grad_norm`.
    pub fn step_unscaled<AB, M>(
        &mut self,
        lr: f64,
        module: M,
        grads: GradientsParams,
        unscale: f64,
    ) -> (M, StepStats)
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        let sq_sum =
            Self::grad_sq_sum(&module, &grads).map_or(0.0, |s| s.into_scalar().elem::<f64>());
        self.step_with_sq_sum(lr, module, grads, unscale, sq_sum)
    }

    /// The sum of the squared gradients of `module`'s params in `grads` (before unscaling),
    /// left on the device as one f32 value (`None` without gradients): the caller reads it
    /// back together with the loss, one transfer per step.
    pub fn grad_sq_sum<AB, M>(module: &M, grads: &GradientsParams) -> Option<Tensor<B, 1>>
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        let mut norm = NormVisitor::<B> {
            grads,
            sums: Vec::new(),
        };
        module.visit(&mut norm);
        (!norm.sums.is_empty()).then(|| Tensor::cat(norm.sums, 0).sum())
    }

    /// [`AdamW::step_unscaled`] with the squared gradient sum already read
    /// ([`AdamW::grad_sq_sum`]).
    pub fn step_with_sq_sum<AB, M>(
        &mut self,
        lr: f64,
        module: M,
        mut grads: GradientsParams,
        unscale: f64,
        sq_sum: f64,
    ) -> (M, StepStats)
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        let grad_norm = sq_sum.sqrt() * unscale;
        if !grad_norm.is_finite() {
            let stats = StepStats {
                grad_norm,
                clip_scale: 0.0,
            };
            return (module, stats);
        }
        let clip_scale = match self.config.max_grad_norm {
            // torch: clip_coef = max_norm / (total_norm + 1e-6), clamped to at most 1.
            Some(max) => (max / (grad_norm + 1e-6)).min(1.0),
            None => 1.0,
        };
        self.step += 1;
        let mut mapper = UpdateMapper::<B> {
            opt: self,
            grads: &mut grads,
            lr,
            // The update multiplies each gradient by this once: unscaling and clipping.
            clip_scale: clip_scale * unscale,
        };
        let module = module.map(&mut mapper);
        (
            module,
            StepStats {
                grad_norm,
                clip_scale,
            },
        )
    }

    /// One parameter's update, returning the new value.
    fn update<const D: usize>(
        &mut self,
        id: ParamId,
        param: Tensor<B, D>,
        grad: Tensor<B, D>,
        lr: f64,
        clip_scale: f64,
    ) -> Tensor<B, D> {
        let c = self.config;
        let shape = param.shape();
        let n = shape.num_elements();
        let g = grad.reshape([n]).mul_scalar(clip_scale);
        let Moments { m, v } = self.moments.remove(&id).unwrap_or_else(|| Moments {
            m: g.zeros_like(),
            v: g.zeros_like(),
        });
        let m = m.mul_scalar(c.beta1) + g.clone().mul_scalar(1.0 - c.beta1);
        let v = v.mul_scalar(c.beta2) + g.clone().powi_scalar(2).mul_scalar(1.0 - c.beta2);
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        // torch.optim.AdamW (foreach=False): p *= 1 - lr*wd; denom = sqrt(v)/sqrt(bc2) + eps;
        // p -= (lr/bc1) * m / denom.
        let p = param.reshape([n]).mul_scalar(1.0 - lr * c.weight_decay);
        let denom = v.clone().sqrt().div_scalar(bc2.sqrt()).add_scalar(c.eps);
        let p = p - m.clone().div(denom).mul_scalar(lr / bc1);
        self.moments.insert(id, Moments { m, v });
        p.reshape(shape)
    }
}

/// Each param's squared gradient sum, on the device in f32 (torch sums the per-tensor
/// norms in f32 too).
struct NormVisitor<'a, B: Backend> {
    grads: &'a GradientsParams,
    sums: Vec<Tensor<B, 1>>,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for NormVisitor<'_, AB::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        if let Some(g) = self.grads.get::<AB::InnerBackend, D>(param.id) {
            self.sums.push(g.cast(DType::F32).powi_scalar(2).sum());
        }
    }
}

struct UpdateMapper<'a, B: Backend> {
    opt: &'a mut AdamW<B>,
    grads: &'a mut GradientsParams,
    lr: f64,
    clip_scale: f64,
}

impl<AB: AutodiffBackend> ModuleMapper<AB> for UpdateMapper<'_, AB::InnerBackend> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<AB::InnerBackend, D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let require_grad = tensor.is_require_grad();
        let updated = self
            .opt
            .update(id, tensor.inner(), grad, self.lr, self.clip_scale);
        let mut tensor = Tensor::from_inner(updated);
        if require_grad {
            tensor = tensor.require_grad();
        }
        Param::from_mapped_value(id, tensor, mapper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{assert_close, fixture};
    use burn::backend::Autodiff;
    use burn::module::Module;

    type AB = Autodiff<crate::test_util::TB>;

    /// A bag of trainable matrices, standing in for the LoRA params.
    #[derive(Module, Debug)]
    struct Bag<B: Backend> {
        params: Vec<Param<Tensor<B, 2>>>,
    }

    /// Gradients equal to `grads` exactly: backward of Σ p·g (constant g) gives g.
    fn grads_of<AB: AutodiffBackend>(bag: &Bag<AB>, grads: &[Tensor<AB, 2>]) -> GradientsParams {
        let mut loss = Tensor::<AB, 1>::zeros([1], &Default::default());
        for (p, g) in bag.params.iter().zip(grads) {
            loss = loss + (p.val() * g.clone()).sum();
        }
        let g = loss.backward();
        GradientsParams::from_grads(g, bag)
    }

    fn tensor(st: &safetensors::SafeTensors<'_>, key: &str) -> (Vec<f32>, [usize; 2]) {
        let v = st.tensor(key).unwrap();
        let data: Vec<f32> = v
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        (data, [v.shape()[0], v.shape()[1]])
    }

    // torch computes the same step in f32 on a GPU; 1e-5 is the bar for `.after`.
    const STEP_ATOL: f32 = 1e-5;

    #[test]
    fn one_adamw_step_matches_torch_on_the_qlora_fixture() {
        adamw_step_matches_torch::<AB>();
    }

    #[test]
    fn one_adamw_step_matches_torch_on_wgpu() {
        if crate::test_util::wgpu_available("one_adamw_step_matches_torch_on_wgpu") {
            adamw_step_matches_torch::<Autodiff<burn::backend::Wgpu>>();
        }
    }

    /// One AdamW step on the fixture's `.before` params and `.grad` gradients lands on
    /// torch's `.after`, on the autodiff backend `AB`.
    fn adamw_step_matches_torch<AB: AutodiffBackend>() {
        let bytes = std::fs::read(fixture("qwen2_5_vl_tiny/qlora_step/step.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let meta: serde_json::Value = serde_json::from_slice(
            &std::fs::read(fixture("qwen2_5_vl_tiny/qlora_step/step.json")).unwrap(),
        )
        .unwrap();
        let mut keys: Vec<String> = st
            .names()
            .into_iter()
            .filter_map(|k| k.strip_suffix(".before").map(str::to_string))
            .collect();
        keys.sort();
        assert_eq!(keys.len(), 28, "7 projections x 2 layers x (A, B)");
        let dev = Default::default();
        let mut params = Vec::new();
        let mut grads = Vec::new();
        for k in &keys {
            let (b, shape) = tensor(&st, &format!("{k}.before"));
            let (g, _) = tensor(&st, &format!("{k}.grad"));
            params.push(Param::from_tensor(
                Tensor::<AB, 1>::from_floats(b.as_slice(), &dev).reshape(shape),
            ));
            grads.push(Tensor::<AB, 1>::from_floats(g.as_slice(), &dev).reshape(shape));
        }
        let bag = Bag { params };
        let gp = grads_of(&bag, &grads);
        let betas = meta["betas"].as_array().unwrap();
        let mut opt = AdamW::new(AdamWConfig {
            beta1: betas[0].as_f64().unwrap(),
            beta2: betas[1].as_f64().unwrap(),
            eps: meta["eps"].as_f64().unwrap(),
            weight_decay: meta["weight_decay"].as_f64().unwrap(),
            max_grad_norm: None,
        });
        let (bag, stats) = opt.step(meta["lr"].as_f64().unwrap(), bag, gp);
        assert_eq!(stats.clip_scale, 1.0);
        for (k, p) in keys.iter().zip(&bag.params) {
            let (want, _) = tensor(&st, &format!("{k}.after"));
            let got = p
                .val()
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .unwrap();
            assert_close(k, &got, &want, STEP_ATOL);
        }
    }

    #[test]
    fn global_norm_clipping_scales_all_gradients_together() {
        let dev = Default::default();
        let bag = Bag {
            params: vec![
                Param::from_tensor(Tensor::<AB, 2>::zeros([1, 2], &dev)),
                Param::from_tensor(Tensor::<AB, 2>::zeros([1, 1], &dev)),
            ],
        };
        // Global norm of [3, 0] and [4] is 5; per-tensor norms are 3 and 4.
        let gp = grads_of(
            &bag,
            &[
                Tensor::from_floats([[3.0, 0.0]], &dev),
                Tensor::from_floats([[4.0]], &dev),
            ],
        );
        let mut opt = AdamW::new(AdamWConfig {
            max_grad_norm: Some(1.0),
            ..Default::default()
        });
        let (_, stats) = opt.step(1e-3, bag, gp);
        assert!((stats.grad_norm - 5.0).abs() < 1e-9);
        assert!((stats.clip_scale - 1.0 / (5.0 + 1e-6)).abs() < 1e-12);
        let m: Vec<f32> = opt
            .moments
            .values()
            .flat_map(|mo| mo.m.clone().into_data().to_vec::<f32>().unwrap())
            .collect();
        let mut m = m;
        m.sort_by(f32::total_cmp);
        // m = (1 - beta1) * clipped grad: 0.1 * [0, 0.6, 0.8]
        assert_close("first moments", &m, &[0.0, 0.06, 0.08], 1e-6);
    }

    /// f16 loss scaling: gradients of a loss scaled by 1024 give the unscaled step exactly
    /// (powers of two), and an overflowed gradient changes neither the params nor the state.
    #[test]
    fn scaled_gradients_unscale_to_the_same_step_and_an_overflow_is_not_applied() {
        let dev = Default::default();
        let bag = || Bag {
            params: vec![Param::from_tensor(Tensor::<AB, 2>::ones([1, 2], &dev))],
        };
        let step = |g: [f32; 2], unscale: f64| {
            let b = bag();
            let gp = grads_of(&b, &[Tensor::from_floats([g], &dev)]);
            let mut opt = AdamW::new(AdamWConfig {
                max_grad_norm: Some(1.0),
                ..Default::default()
            });
            let (b, stats) = opt.step_unscaled(0.1, b, gp, unscale);
            let p = b.params[0].val().into_data().to_vec::<f32>().unwrap();
            (p, stats, opt.step, opt.moments.len())
        };
        let (plain, s1, ..) = step([3.0, 4.0], 1.0);
        let (scaled, s2, ..) = step([3.0 * 1024.0, 4.0 * 1024.0], 1.0 / 1024.0);
        assert_eq!(plain, scaled);
        assert_eq!(s1.grad_norm, s2.grad_norm);
        let (p, stats, steps, moments) = step([f32::INFINITY, 4.0], 1.0 / 1024.0);
        assert_eq!(p, vec![1.0, 1.0]);
        assert!(!stats.grad_norm.is_finite());
        assert_eq!((steps, moments), (0, 0));
    }

    #[test]
    fn params_without_gradient_are_untouched() {
        let dev = Default::default();
        let frozen =
            Param::from_tensor(Tensor::<AB, 2>::ones([2, 2], &dev)).set_require_grad(false);
        let bag = Bag {
            params: vec![
                frozen,
                Param::from_tensor(Tensor::<AB, 2>::ones([1, 1], &dev)),
            ],
        };
        let g = (bag.params[1].val() * 2.0).sum().backward();
        let gp = GradientsParams::from_grads(g, &bag);
        let mut opt = AdamW::new(AdamWConfig::default());
        let (bag, _) = opt.step(0.1, bag, gp);
        assert_eq!(
            bag.params[0].val().into_data().to_vec::<f32>().unwrap(),
            vec![1.0; 4]
        );
        assert_ne!(
            bag.params[1].val().into_data().to_vec::<f32>().unwrap(),
            vec![1.0]
        );
        assert_eq!(opt.moments.len(), 1);
    }
}

//! AdamW as PyTorch's `torch.optim.AdamW` (decoupled weight decay, bias-corrected moments,
//! eps added after the square root), with optional clipping by the *global* gradient norm as
//! `torch.nn.utils.clip_grad_norm_` (burn's built-in clipping is per tensor).
//!
//! The optimizer works on any autodiff module: it visits the float params that received a
//! gradient, updates them on the inner backend, and keeps their moments keyed by `ParamId`
//! (create trainable params with stable ids so a resumed run finds its state).
//!
//! A step reads nothing back from the device ([`AdamW::step_on_device`]): the norm, the
//! clipping factor and whether the gradients were finite stay tensors, and a step whose
//! gradients overflowed is masked out on the device (params, moments and step count
//! unchanged, as torch's `GradScaler` skips `optimizer.step()`). The bias correction needs
//! the count of applied steps, which only the device knows between reads; the host uploads
//! the correction for every count the step can have and the device picks its own, so the
//! arithmetic is the host's f64 rounded once to f32, as when the count is known.

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

/// AdamW state: the count of applied steps and per-parameter moments on the inner
/// (non-autodiff) backend.
#[derive(Debug)]
pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    pub moments: HashMap<ParamId, Moments<B>>,
    /// Steps applied as of the last [`AdamW::settle`] (or resume).
    settled: u64,
    /// Steps taken since then, applied or not (known on the host).
    taken: u64,
    /// How many of those were applied, on the device (`None` when `taken` is 0).
    applied: Option<Tensor<B, 1, Int>>,
}

/// What one step did, for training metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: f64,
    /// Factor the gradients were scaled by (1 when not clipped).
    pub clip_scale: f64,
}

/// What one step left on the device ([`AdamW::step_on_device`]), each a `[1]` tensor.
#[derive(Debug, Clone)]
pub struct DeviceStep<B: Backend> {
    /// Global L2 norm of the unscaled gradients before clipping (f32); not finite exactly
    /// when the step was not applied.
    pub grad_norm: Tensor<B, 1>,
    /// Factor the unscaled gradients were multiplied by (1 when not clipped).
    pub clip_scale: Tensor<B, 1>,
    /// Whether the step was applied (its gradients were all finite).
    pub applied: Tensor<B, 1, Bool>,
}

impl<B: Backend> AdamW<B> {
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            moments: HashMap::new(),
            settled: 0,
            taken: 0,
            applied: None,
        }
    }

    /// Continues from `steps` applied steps (a checkpoint's count).
    pub fn resume_at(&mut self, steps: u64) {
        self.settled = steps;
        self.taken = 0;
        self.applied = None;
    }

    /// Steps applied so far (the bias correction's `t`). Reads the device when steps were
    /// taken since the last [`AdamW::settle`].
    pub fn steps(&self) -> u64 {
        self.settled
            + self
                .applied
                .clone()
                .map_or(0, |a| a.into_scalar().elem::<i64>() as u64)
    }

    /// The device's count of steps applied since the last settlement (`None`: none taken),
    /// for the caller to read back with its other values and hand to [`AdamW::settle`].
    pub fn unsettled(&self) -> Option<Tensor<B, 1, Int>> {
        self.applied.clone()
    }

    /// Records that `applied` of the steps since the last settlement were applied (read
    /// back from [`AdamW::unsettled`]), so the next step's corrections start there.
    pub fn settle(&mut self, applied: u64) {
        self.settled += applied;
        self.taken = 0;
        self.applied = None;
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
    /// the module and the state come back unchanged, with a non-finite `grad_norm`. Reads
    /// the step's figures back (the trainer uses [`AdamW::step_on_device`]).
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
        let unscale = |device: &B::Device| (unscale != 1.0).then(|| scalar::<B>(unscale, device));
        let (module, step) = self.step_with(lr, module, grads, unscale);
        let Some(step) = step else {
            return (
                module,
                StepStats {
                    grad_norm: 0.0,
                    clip_scale: 1.0,
                },
            );
        };
        let read = Tensor::cat(
            vec![
                step.grad_norm,
                step.clip_scale,
                step.applied.int().float().cast(DType::F32),
            ],
            0,
        )
        .into_data()
        .convert::<f64>()
        .to_vec::<f64>()
        .expect("f64 after convert");
        self.settle(read[2] as u64);
        let stats = StepStats {
            grad_norm: read[0],
            clip_scale: if read[2] == 1.0 { read[1] } else { 0.0 },
        };
        (module, stats)
    }

    /// One step, left on the device: the gradient norm (in f32, as torch sums it) and the
    /// clipping factor are computed there, and a step with a non-finite gradient is masked
    /// out there. `unscale` (`[1]`, f16 loss scaling) multiplies the gradients first. Returns
    /// `None` (and changes nothing) when no param of `module` has a gradient.
    pub fn step_on_device<AB, M>(
        &mut self,
        lr: f64,
        module: M,
        grads: GradientsParams,
        unscale: Option<Tensor<B, 1>>,
    ) -> (M, Option<DeviceStep<B>>)
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        self.step_with(lr, module, grads, |_| unscale)
    }

    /// [`AdamW::step_on_device`] with the unscaling factor made once the gradients' device
    /// is known (from their squared sums, which the norm needs anyway).
    fn step_with<AB, M>(
        &mut self,
        lr: f64,
        module: M,
        mut grads: GradientsParams,
        unscale: impl FnOnce(&B::Device) -> Option<Tensor<B, 1>>,
    ) -> (M, Option<DeviceStep<B>>)
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        let mut norm = NormVisitor::<B> {
            grads: &grads,
            sums: Vec::new(),
        };
        module.visit(&mut norm);
        if norm.sums.is_empty() {
            return (module, None);
        }
        let mut grad_norm = Tensor::cat(norm.sums, 0).sum().sqrt();
        let device = grad_norm.device();
        let unscale = unscale(&device);
        if let Some(u) = &unscale {
            grad_norm = grad_norm * u.clone();
        }
        let applied = grad_norm.clone().is_finite();
        let clip_scale = match self.config.max_grad_norm {
            // torch: clip_coef = max_norm / (total_norm + 1e-6), clamped to at most 1.
            Some(max) => scalar::<B>(max, &device)
                .div(grad_norm.clone().add_scalar(1e-6))
                .clamp_max(1.0),
            None => scalar::<B>(1.0, &device),
        };
        // The update multiplies each gradient by this once: unscaling and clipping.
        let factor = match unscale {
            Some(u) => clip_scale.clone() * u,
            None => clip_scale.clone(),
        };
        let corrections = self.corrections(lr, &device);
        let mut mapper = UpdateMapper::<B> {
            opt: self,
            grads: &mut grads,
            step: UpdateInputs {
                lr,
                factor,
                corrections,
                applied: applied.clone(),
            },
        };
        let module = module.map(&mut mapper);
        let counted = applied.clone().int();
        self.applied = Some(match self.applied.take() {
            Some(a) => a + counted,
            None => counted,
        });
        self.taken += 1;
        let step = DeviceStep {
            grad_norm,
            clip_scale,
            applied,
        };
        (module, Some(step))
    }

    /// This step's bias corrections `[lr / (1 - β1^t), sqrt(1 - β2^t)]`, each `[1]` in f32,
    /// for the device's count `t`: the host computes them in f64 for every `t` the step can
    /// have (`settled + 1 ..= settled + taken + 1`) and the device selects by its count of
    /// applied steps since the settlement.
    fn corrections(&self, lr: f64, device: &B::Device) -> [Tensor<B, 1>; 2] {
        let c = self.config;
        let candidates = self.taken as usize + 1;
        let (mut step_size, mut root) = (Vec::new(), Vec::new());
        for k in 1..=candidates as u64 {
            let t = (self.settled + k) as i32;
            step_size.push((lr / (1.0 - c.beta1.powi(t))) as f32);
            root.push((1.0 - c.beta2.powi(t)).sqrt() as f32);
        }
        let index = self
            .applied
            .clone()
            .unwrap_or_else(|| Tensor::zeros([1], device));
        [step_size, root].map(|v| {
            Tensor::<B, 1>::from_data(TensorData::new(v, [candidates]), (device, DType::F32))
                .select(0, index.clone())
        })
    }

    /// One parameter's update on the device, returning the new value; where `applied` is
    /// false the param and its moments stay as they were.
    fn update<const D: usize>(
        &mut self,
        id: ParamId,
        param: Tensor<B, D>,
        grad: Tensor<B, D>,
        step: &UpdateInputs<B>,
    ) -> Tensor<B, D> {
        let c = self.config;
        let shape = param.shape();
        let n = shape.num_elements();
        let keep = step.applied.clone().expand([n]);
        let g = grad.reshape([n]) * step.factor.clone();
        let Moments { m: m0, v: v0 } = self.moments.remove(&id).unwrap_or_else(|| Moments {
            m: g.zeros_like(),
            v: g.zeros_like(),
        });
        let m = m0.clone().mul_scalar(c.beta1) + g.clone().mul_scalar(1.0 - c.beta1);
        let v = v0.clone().mul_scalar(c.beta2) + g.powi_scalar(2).mul_scalar(1.0 - c.beta2);
        let [step_size, root] = &step.corrections;
        // torch.optim.AdamW (foreach=False): p *= 1 - lr*wd; denom = sqrt(v)/sqrt(bc2) + eps;
        // p -= (lr/bc1) * m / denom.
        let p0 = param.reshape([n]);
        let p = p0.clone().mul_scalar(1.0 - step.lr * c.weight_decay);
        let denom = (v.clone().sqrt() / root.clone()).add_scalar(c.eps);
        let p = p - m.clone().div(denom) * step_size.clone();
        let m = m0.mask_where(keep.clone(), m);
        let v = v0.mask_where(keep.clone(), v);
        self.moments.insert(id, Moments { m, v });
        p0.mask_where(keep, p).reshape(shape)
    }
}

/// `value` as a `[1]` f32 tensor (whatever the device's default float type).
fn scalar<B: Backend>(value: f64, device: &B::Device) -> Tensor<B, 1> {
    Tensor::from_data(
        TensorData::new(vec![value as f32], [1]),
        (device, DType::F32),
    )
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

/// What every param's update in one step shares, on the device.
struct UpdateInputs<B: Backend> {
    lr: f64,
    /// Unscaling times clipping.
    factor: Tensor<B, 1>,
    /// `[lr / bc1, sqrt(bc2)]` ([`AdamW::corrections`]).
    corrections: [Tensor<B, 1>; 2],
    applied: Tensor<B, 1, Bool>,
}

struct UpdateMapper<'a, B: Backend> {
    opt: &'a mut AdamW<B>,
    grads: &'a mut GradientsParams,
    step: UpdateInputs<B>,
}

impl<AB: AutodiffBackend> ModuleMapper<AB> for UpdateMapper<'_, AB::InnerBackend> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<AB::InnerBackend, D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let require_grad = tensor.is_require_grad();
        let updated = self.opt.update(id, tensor.inner(), grad, &self.step);
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
        // In f32 on the device, as torch computes it.
        assert!((stats.clip_scale - 1.0 / (5.0 + 1e-6)).abs() < 1e-7);
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
            // Moments of a masked first step exist but are zero, as torch's lazy init.
            let moments: f32 = opt
                .moments
                .values()
                .flat_map(|mo| [mo.m.clone(), mo.v.clone()])
                .map(|t| t.abs().sum().into_scalar())
                .sum();
            (p, stats, opt.steps(), moments)
        };
        let (plain, s1, ..) = step([3.0, 4.0], 1.0);
        let (scaled, s2, ..) = step([3.0 * 1024.0, 4.0 * 1024.0], 1.0 / 1024.0);
        assert_eq!(plain, scaled);
        assert_eq!(s1.grad_norm, s2.grad_norm);
        let (p, stats, steps, moments) = step([f32::INFINITY, 4.0], 1.0 / 1024.0);
        assert_eq!(p, vec![1.0, 1.0]);
        assert!(!stats.grad_norm.is_finite());
        assert_eq!((steps, moments), (0, 0.0));
    }

    /// Steps left on the device, with overflows among them and the count read only at the
    /// end, land exactly where steps read one by one do: a masked step changes nothing and
    /// the bias correction of each applied step uses the count of applied steps before it.
    #[test]
    fn steps_on_the_device_with_overflows_match_steps_read_one_at_a_time_bit_for_bit() {
        use crate::train::scaler::{DeviceScaler, LossScaler};
        type B = crate::test_util::TB;
        let dev = Default::default();
        let inf = f32::INFINITY;
        // Gradients of the scaled loss, per step; the 2nd, 3rd and 6th overflow.
        let grads: [[f32; 2]; 7] = [
            [3.0, 4.0],
            [inf, 1.0],
            [f32::NAN, 1.0],
            [-2.0, 0.5],
            [0.25, 8.0],
            [inf, -inf],
            [1.0, -1.0],
        ];
        let config = AdamWConfig {
            max_grad_norm: Some(1.0),
            weight_decay: 0.1,
            ..Default::default()
        };
        let lr = |k: usize| 0.1 / (k + 1) as f64;
        let fresh = || Bag {
            params: vec![Param::from_tensor(Tensor::<AB, 2>::ones([1, 2], &dev))],
        };
        let values = |b: &Bag<AB>, o: &AdamW<B>| {
            let mut v = b.params[0].val().into_data().to_vec::<f32>().unwrap();
            for mo in o.moments.values() {
                v.extend(mo.m.clone().into_data().to_vec::<f32>().unwrap());
                v.extend(mo.v.clone().into_data().to_vec::<f32>().unwrap());
            }
            v
        };

        // Read one at a time: the scale known on the host, the count settled each step.
        let (mut bag, mut opt, mut host) =
            (fresh(), AdamW::<B>::new(config), LossScaler::default());
        for (k, g) in grads.iter().enumerate() {
            let scale = host.scale;
            let gp = grads_of(&bag, &[Tensor::from_floats([*g], &dev)]);
            let stats;
            (bag, stats) = opt.step_unscaled(lr(k), bag, gp, 1.0 / scale);
            let finite = stats.grad_norm.is_finite();
            assert_eq!(finite, g.iter().all(|x| x.is_finite()), "step {k}");
            // torch's GradScaler rule.
            if finite {
                host.good_steps += 1;
            } else {
                host.scale *= 0.5;
                host.good_steps = 0;
            }
        }
        let one_by_one = (values(&bag, &opt), opt.steps(), host);

        // Left on the device: nothing read until the end.
        let (mut bag, mut opt) = (fresh(), AdamW::<B>::new(config));
        let mut scaler = DeviceScaler::<B>::new(LossScaler::default(), &dev);
        for (k, g) in grads.iter().enumerate() {
            let gp = grads_of(&bag, &[Tensor::from_floats([*g], &dev)]);
            let step;
            (bag, step) = opt.step_on_device(lr(k), bag, gp, Some(scaler.scale().recip()));
            scaler.update(step.unwrap().applied);
        }
        let v = scaler
            .values()
            .into_data()
            .convert::<f64>()
            .to_vec::<f64>()
            .unwrap();
        let deferred = (
            values(&bag, &opt),
            opt.steps(),
            DeviceScaler::<B>::read([v[0], v[1]]),
        );

        assert_eq!(deferred, one_by_one);
        assert_eq!(one_by_one.1, 4, "four of seven steps applied");
        assert_eq!(
            one_by_one.2.scale, 8192.0,
            "three overflows halved the scale"
        );
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

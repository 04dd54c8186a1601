//! LoRA on the assembled model: attach a peft adapter or fresh pairs to the language model's
//! q/k/v/o/gate/up/down projections, export them back as an [`Adapter`], freeze everything
//! that is not LoRA, and merge the pairs into dense weights.
//!
//! Follows peft 0.21 `tuners/lora/model.py` (`_create_and_replace`, `merge_and_unload`) and
//! `peft_model.py` (`get_peft_model` freezes every non-adapter parameter).

use std::collections::BTreeMap;

use burn::module::{Module, ParamId};

use crate::kernels::Kernels;
use crate::model::lora::{Adapter, AdapterConfig, Lora, LoraSpec, Site, TARGET_MODULES};
use crate::model::qwen::Qwen25Vl;

/// Lives in `model::error` beside the other model errors; re-exported here, where it is raised.
pub use crate::model::error::AdaptError;

impl<B: Kernels> Qwen25Vl<B> {
    /// Attaches every pair of `adapter` (replacing pairs already there). All sites and shapes
    /// are checked before anything is attached; an adapter may cover a subset of the targets.
    ///
    /// # Errors
    /// [`AdaptError::UnknownSite`] or [`AdaptError::Shape`], naming the site.
    pub fn attach_adapter(
        &mut self,
        adapter: &Adapter,
        device: &B::Device,
    ) -> Result<(), AdaptError> {
        let layers = self.config().text.num_layers;
        let dims: BTreeMap<Site, [usize; 2]> = self
            .text()
            .targets()
            .into_iter()
            .map(|(s, p)| (s, p.dims()))
            .collect();
        for (site, w) in &adapter.pairs {
            let [d_in, d_out] = *dims.get(site).ok_or_else(|| AdaptError::UnknownSite {
                site: site.peft_prefix(),
                layers,
            })?;
            if w.a_shape[1] != d_in || w.b_shape[0] != d_out || w.a_shape[0] != w.b_shape[1] {
                return Err(AdaptError::Shape {
                    site: site.peft_prefix(),
                    a: w.a_shape,
                    b: w.b_shape,
                    d_in,
                    d_out,
                });
            }
        }
        let scaling = adapter.config.scaling();
        let dropout = adapter.config.lora_dropout;
        for (site, proj) in self.text_mut().targets_mut() {
            if let Some(w) = adapter.pairs.get(&site) {
                proj.set_lora(Some(Lora::from_weights(&site, w, scaling, dropout, device)));
            }
        }
        Ok(())
    }

    /// Adds fresh pairs (peft's default init: B = 0, so the output is unchanged) on every
    /// target projection of every decoder layer, replacing pairs already there.
    pub fn add_lora(&mut self, spec: &LoraSpec, device: &B::Device) {
        for (site, proj) in self.text_mut().targets_mut() {
            let lora = Lora::init(&site, proj.dims(), spec, device);
            proj.set_lora(Some(lora));
        }
    }

    /// The attached pairs as a peft adapter (`base`: `base_model_name_or_path`).
    ///
    /// # Errors
    /// [`AdaptError::NoLora`] without pairs; [`AdaptError::Mixed`] when pairs differ in rank,
    /// scaling or dropout.
    pub fn export_adapter(&self, base: Option<String>) -> Result<Adapter, AdaptError> {
        let mut pairs = BTreeMap::new();
        let mut first: Option<(Site, usize, f64, f64)> = None;
        let mut modules: Vec<&str> = Vec::new();
        for (site, proj) in self.text().targets() {
            let Some(l) = proj.lora() else { continue };
            let (r, s, d) = (l.rank(), l.scaling(), l.dropout());
            match &first {
                None => first = Some((site.clone(), r, s, d)),
                Some((f, r0, s0, d0)) if (*r0, *s0, *d0) != (r, s, d) => {
                    return Err(AdaptError::Mixed {
                        first: f.peft_prefix(),
                        r0: *r0,
                        s0: *s0,
                        d0: *d0,
                        other: site.peft_prefix(),
                        r1: r,
                        s1: s,
                        d1: d,
                    })
                }
                Some(_) => {}
            }
            let name = site.module.rsplit('.').next().unwrap_or_default();
            if let Some(t) = TARGET_MODULES.iter().find(|t| **t == name) {
                if !modules.contains(t) {
                    modules.push(t);
                }
            }
            pairs.insert(site, l.weights());
        }
        let (_, r, scaling, dropout) = first.ok_or(AdaptError::NoLora)?;
        // alpha = scaling · r reproduces the scaling under peft's default (non-rs) LoRA.
        let mut config = AdapterConfig::for_targets(r, scaling * r as f64, dropout, base);
        if modules.len() < TARGET_MODULES.len() {
            modules.sort_by_key(|m| TARGET_MODULES.iter().position(|t| t == m));
            config.target_modules = format!(r".*language_model.*\.({})", modules.join("|")).into();
        }
        Ok(Adapter { config, pairs })
    }

    /// Marks every parameter frozen except the LoRA pairs (vision tower, embeddings, norms,
    /// `lm_head` and every projection base stop receiving gradients).
    pub fn freeze_except_lora(self) -> Self {
        let mut m = self.no_grad();
        for (_, proj) in m.text_mut().targets_mut() {
            let lora = proj.lora().cloned().map(Lora::trainable);
            if lora.is_some() {
                proj.set_lora(lora);
            }
        }
        m
    }

    /// Sets this model's LoRA pairs to copies of `other`'s (the same architecture) on
    /// `device`, trainable: a data parallel replica takes the first device's pairs before
    /// each step, so every peer computes with the same weights.
    pub fn take_lora_from(&mut self, other: &Self, device: &B::Device) {
        let theirs = other.text().targets();
        for ((_, proj), (_, src)) in self.text_mut().targets_mut().into_iter().zip(theirs) {
            proj.set_lora(src.lora().map(|l| l.clone().fork(device).trainable()));
        }
    }

    /// Folds every pair into its dense base (`W + s·B·A`) and removes the pairs.
    pub fn merge_lora(&mut self) {
        for (_, proj) in self.text_mut().targets_mut() {
            proj.merge_lora();
        }
    }

    /// Param id and peft key (`….lora_A.weight`) of every LoRA param, in site order.
    pub fn lora_params(&self) -> Vec<(ParamId, String)> {
        let mut out = Vec::new();
        for (site, proj) in self.text().targets() {
            if let Some(l) = proj.lora() {
                let [a, b] = l.param_ids();
                let p = site.peft_prefix();
                out.push((a, format!("{p}.lora_A.weight")));
                out.push((b, format!("{p}.lora_B.weight")));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::qwen::tests::{image, reference, tiny};
    use crate::test_util::{assert_close, fixture, fixture_f32s, TB};
    use burn::optim::GradientsParams;

    type AD = burn::backend::Autodiff<TB>;

    /// peft on CUDA f32; the same bar as the base model's logits (torch-on-CPU lands within
    /// 2e-6 of the reference, 1e-4 leaves room for a different f32 summation order).
    const LOGITS_ATOL: f32 = 1e-4;
    /// Merged vs unmerged differ only in rounding of `W + s·B·A` vs the two products.
    const MERGE_ATOL: f32 = 1e-4;

    fn lora_reference() -> Vec<f32> {
        fixture_f32s("qwen2_5_vl_tiny/lora/reference.safetensors", "logits")
    }

    fn logits(m: &Qwen25Vl<TB>) -> Vec<f32> {
        let r = reference();
        let out = m
            .forward(
                std::slice::from_ref(&r.input_ids),
                None,
                Some(&image(&r)),
                &Default::default(),
            )
            .unwrap();
        out.logits.into_data().to_vec::<f32>().unwrap()
    }

    fn fixture_adapter() -> Adapter {
        Adapter::load(&fixture("qwen2_5_vl_tiny/lora")).unwrap()
    }

    #[test]
    fn fixture_adapter_on_the_f32_model_reproduces_peft_logits() {
        let mut m = tiny();
        m.attach_adapter(&fixture_adapter(), &Default::default())
            .unwrap();
        assert_close("lora logits", &logits(&m), &lora_reference(), LOGITS_ATOL);
    }

    #[test]
    fn exported_adapter_has_peft_keys_and_reloads_to_the_same_logits() {
        let dev = Default::default();
        let mut m = tiny();
        let original = fixture_adapter();
        m.attach_adapter(&original, &dev).unwrap();
        let exported = m.export_adapter(None).unwrap();
        assert_eq!(exported.pairs, original.pairs, "weights round-trip exactly");
        assert_eq!(exported.config.scaling(), original.config.scaling());
        assert_eq!(
            exported.config.target_modules,
            original.config.target_modules
        );
        let dir = tempfile::tempdir().unwrap();
        exported.save(dir.path()).unwrap();
        let keys = |p: std::path::PathBuf| {
            let b = std::fs::read(p).unwrap();
            let mut k: Vec<String> = safetensors::SafeTensors::deserialize(&b)
                .unwrap()
                .names()
                .into_iter()
                .map(String::from)
                .collect();
            k.sort();
            k
        };
        assert_eq!(
            keys(dir.path().join("adapter_model.safetensors")),
            keys(fixture("qwen2_5_vl_tiny/lora/adapter_model.safetensors"))
        );
        let mut again = tiny();
        again
            .attach_adapter(&Adapter::load(dir.path()).unwrap(), &dev)
            .unwrap();
        assert_eq!(logits(&again), logits(&m));
    }

    #[test]
    fn fresh_lora_leaves_logits_unchanged_and_exports_every_target() {
        let base = logits(&tiny());
        let mut m = tiny();
        let spec = LoraSpec {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            seed: 3,
        };
        m.add_lora(&spec, &Default::default());
        assert_eq!(logits(&m), base, "B = 0: the update is exactly zero");
        let a = m.export_adapter(None).unwrap();
        assert_eq!(a.pairs.len(), 14);
        assert_eq!(a.config.r, 4);
        assert_eq!(a.config.scaling(), 2.0);
        assert!(a.pairs.values().all(|w| w.b.iter().all(|&x| x == 0.0)));
        assert!(a.pairs.values().all(|w| w.a.iter().any(|&x| x != 0.0)));
    }

    #[test]
    fn merged_adapter_gives_the_adapted_logits_without_pairs() {
        let mut m = tiny();
        m.attach_adapter(&fixture_adapter(), &Default::default())
            .unwrap();
        m.merge_lora();
        assert!(matches!(m.export_adapter(None), Err(AdaptError::NoLora)));
        assert_close("merged", &logits(&m), &lora_reference(), MERGE_ATOL);
    }

    #[test]
    fn adapter_sites_the_model_lacks_are_rejected_naming_the_site() {
        let mut a = fixture_adapter();
        let w = a.pairs.values().next().unwrap().clone();
        a.pairs.insert(Site::new(7, "self_attn.q_proj"), w);
        let e = tiny()
            .attach_adapter(&a, &Default::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("layers.7.self_attn.q_proj") && e.contains("2 decoder layers"),
            "{e}"
        );
    }

    #[test]
    fn adapter_pairs_of_the_wrong_width_are_rejected_naming_the_site_and_shapes() {
        let mut a = fixture_adapter();
        let site = Site::new(1, "mlp.down_proj");
        let w = a.pairs.get_mut(&site).unwrap();
        w.a_shape = [8, 88];
        w.a.truncate(8 * 88);
        let mut m = tiny();
        let e = m
            .attach_adapter(&a, &Default::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("layers.1.mlp.down_proj") && e.contains("[8, 88]") && e.contains("d_in 176"),
            "{e}"
        );
        assert!(
            matches!(m.export_adapter(None), Err(AdaptError::NoLora)),
            "nothing attached on error"
        );
    }

    #[test]
    fn after_backward_only_lora_params_have_gradients() {
        let dev = Default::default();
        let r = reference();
        let mut m = Qwen25Vl::<AD>::load(&fixture("qwen2_5_vl_tiny"), &dev).unwrap();
        m.attach_adapter(&fixture_adapter(), &dev).unwrap();
        let m = m.freeze_except_lora();
        let img = image::<AD>(&r);
        let out = m
            .forward(std::slice::from_ref(&r.input_ids), None, Some(&img), &dev)
            .unwrap();
        let grads = out.logits.powi_scalar(2).mean().backward();
        let gp = GradientsParams::from_grads(grads, &m);
        let lora = m.lora_params();
        assert_eq!(lora.len(), 28);
        assert_eq!(gp.len(), 28, "gradients exist for the 28 LoRA params only");
        for (id, key) in &lora {
            let g = gp.get::<TB, 2>(*id);
            assert!(g.is_some(), "{key} has no gradient");
        }
    }
}

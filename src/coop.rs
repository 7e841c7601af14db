//! CoOp's prompt learner (Zhou et al., "Learning to Prompt for Vision-Language Models"): learned
//! context vectors replace the embeddings of placeholder tokens in "X X X X {class}." and the
//! frozen CLIP text encoder turns the prompts into class features. Unified or class-specific
//! context; class token at the end, middle or front (as CoOp's `class_token_position`).

use candle_core::{Result, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::clip::tokenizer::ClipTokenizer;
use crate::clip::Clip;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClassTokenPosition {
    #[default]
    End,
    Middle,
    Front,
}

/// How to build the context.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CoopOptions {
    pub n_ctx: usize,
    /// Initialise from this phrase's token embeddings (n_ctx becomes its token count).
    pub init: Option<String>,
    pub class_specific: bool,
    pub position: ClassTokenPosition,
    pub seed: u64,
}

impl Default for CoopOptions {
    fn default() -> Self {
        Self {
            n_ctx: 4,
            init: Some("a photo of a".into()),
            class_specific: false,
            position: ClassTokenPosition::End,
            seed: 1,
        }
    }
}

/// The prompt learner: context vectors plus the frozen token embeddings of each class prompt.
#[derive(Debug, Clone)]
pub struct PromptLearner {
    /// `[n_ctx, W]` (unified) or `[C, n_ctx, W]` (class-specific).
    pub ctx: Var,
    /// Token embeddings of "[SOS] X .. X name . [EOT] ..." cut after the longest EOT: `[C, L, W]`.
    pub token_embeds: Tensor,
    pub eot: Vec<usize>,
    /// Number of BPE tokens of each class name (including the final ".").
    pub name_lens: Vec<usize>,
    pub n_ctx: usize,
    pub position: ClassTokenPosition,
    pub class_names: Vec<String>,
}

impl PromptLearner {
    pub fn new(
        clip: &Clip,
        tok: &ClipTokenizer,
        class_names: &[String],
        opts: &CoopOptions,
    ) -> Result<Self> {
        if class_names.is_empty() {
            candle_core::bail!("no classes to build prompts for");
        }
        let ctx_len = clip.config.text_config.max_position_embeddings;
        let w = clip.config.text_config.hidden_size;
        let dev = clip.device();
        let (n_ctx, init_vec) = match &opts.init {
            Some(phrase) => {
                let ids = tok.encode(phrase);
                if ids.is_empty() {
                    candle_core::bail!("the context init phrase {phrase:?} has no tokens");
                }
                let t = clip
                    .text
                    .embed_tokens(&Tensor::from_vec(ids.clone(), (1, ids.len()), dev)?)?
                    .squeeze(0)?;
                (ids.len(), Some(t))
            }
            None => (opts.n_ctx, None),
        };
        let c = class_names.len();
        let mut rows = Vec::with_capacity(c);
        let mut eot = Vec::with_capacity(c);
        let mut name_lens = Vec::with_capacity(c);
        for name in class_names {
            let placeholder = vec!["X"; n_ctx].join(" ");
            let ids = tok.tokenize(&format!("{placeholder} {name}."), ctx_len);
            let e = ids
                .iter()
                .position(|&t| t == crate::clip::tokenizer::EOT)
                .unwrap_or(ids.len() - 1);
            if e < n_ctx + 2 {
                candle_core::bail!("class name {name:?} does not fit the {ctx_len}-token context with {n_ctx} context tokens");
            }
            name_lens.push(e - 1 - n_ctx);
            eot.push(e);
            rows.push(ids);
        }
        let len = eot.iter().max().copied().unwrap_or(0) + 1;
        let ids = crate::clip::text::ids_tensor(&rows, len, dev)?;
        let token_embeds = clip.text.embed_tokens(&ids)?.detach();
        let ctx = match (init_vec, opts.class_specific) {
            (Some(t), false) => Var::from_tensor(&t)?,
            (Some(t), true) => {
                Var::from_tensor(&t.unsqueeze(0)?.broadcast_as((c, n_ctx, w))?.contiguous()?)?
            }
            (None, cs) => {
                let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
                let normal = Normal::new(0f32, 0.02).map_err(candle_core::Error::wrap)?;
                let n = if cs { c * n_ctx * w } else { n_ctx * w };
                let v: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
                if cs {
                    Var::from_vec(v, (c, n_ctx, w), dev)?
                } else {
                    Var::from_vec(v, (n_ctx, w), dev)?
                }
            }
        };
        Ok(Self {
            ctx,
            token_embeds,
            eot,
            name_lens,
            n_ctx,
            position: opts.position,
            class_names: class_names.to_vec(),
        })
    }

    /// Build from parts (for checkpoints and tests). `token_embeds`: `[C, L, W]`.
    pub fn from_parts(
        ctx: Var,
        token_embeds: Tensor,
        eot: Vec<usize>,
        n_ctx: usize,
        class_names: Vec<String>,
    ) -> Self {
        let name_lens = eot.iter().map(|e| e - 1 - n_ctx).collect();
        Self {
            ctx,
            token_embeds,
            eot,
            name_lens,
            n_ctx,
            position: ClassTokenPosition::End,
            class_names,
        }
    }

    pub fn num_classes(&self) -> usize {
        self.eot.len()
    }

    /// The prompt embeddings `[C, L, W]` with the context in place.
    pub fn prompts(&self) -> Result<Tensor> {
        let (c, l, w) = self.token_embeds.dims3()?;
        let n = self.n_ctx;
        let ctx = match self.ctx.as_tensor().rank() {
            2 => self.ctx.as_tensor().unsqueeze(0)?.broadcast_as((c, n, w))?,
            _ => self.ctx.as_tensor().clone(),
        };
        let prefix = self.token_embeds.narrow(1, 0, 1)?;
        let suffix = self.token_embeds.narrow(1, 1 + n, l - 1 - n)?;
        match self.position {
            ClassTokenPosition::End => Tensor::cat(&[&prefix, &ctx, &suffix], 1),
            ClassTokenPosition::Middle | ClassTokenPosition::Front => {
                let mut rows = Vec::with_capacity(c);
                for i in 0..c {
                    let name_len = self.name_lens[i];
                    let p = prefix.narrow(0, i, 1)?;
                    let ci = ctx.narrow(0, i, 1)?;
                    let sfx = suffix.narrow(0, i, 1)?;
                    let name = sfx.narrow(1, 0, name_len)?;
                    let rest = sfx.narrow(1, name_len, l - 1 - n - name_len)?;
                    let row = if self.position == ClassTokenPosition::Front {
                        Tensor::cat(&[&p, &name, &ci, &rest], 1)?
                    } else {
                        let half = n / 2;
                        let c1 = ci.narrow(1, 0, half)?;
                        let c2 = ci.narrow(1, half, n - half)?;
                        Tensor::cat(&[&p, &c1, &name, &c2, &rest], 1)?
                    };
                    rows.push(row);
                }
                Tensor::cat(&rows, 0)
            }
        }
    }

    /// How many leading prompt positions are the same for every class: the start token and
    /// the context before the class name (none of it when the context is class-specific).
    pub fn shared_positions(&self) -> usize {
        if self.ctx.as_tensor().rank() == 3 {
            return 1;
        }
        match self.position {
            ClassTokenPosition::End => 1 + self.n_ctx,
            ClassTokenPosition::Middle => 1 + self.n_ctx / 2,
            ClassTokenPosition::Front => 1,
        }
    }

    /// Text features `[C, d]` (not normalised); the shared prompt start is computed once.
    pub fn text_features(&self, clip: &Clip) -> Result<Tensor> {
        clip.text
            .forward_embeds_shared(&self.prompts()?, self.shared_positions(), &self.eot)
    }
}

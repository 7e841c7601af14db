//! TextRefiner Explorer: CLIP prompt tuning (CoOp + TextRefiner) that you can inspect.
//!
//! The core (everything here without the `gui` feature) loads real CLIP weights into our own
//! candle implementation ([`clip`]), tokenizes with OpenAI's BPE and preprocesses images as
//! CLIP does. Every failure that concerns a file is an [`error::Error`] naming the file and the
//! problem; nothing in the core panics on bad input.

pub mod bench_train;
pub mod checkpoint;
pub mod cli;
pub mod clip;
pub mod colormap;
pub mod commands;
pub mod coop;
pub mod data;
pub mod error;
pub mod eval;
pub mod experiment;
pub mod explore;
pub mod features;
pub mod pretrain;
pub mod refiner;
pub mod train;
pub mod util;
pub mod worker;

pub use error::{Error, Result};

#[cfg(feature = "gui")]
pub mod app;

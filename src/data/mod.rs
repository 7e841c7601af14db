//! Data: dataset readers in the layouts researchers use, few-shot and base/new splits, and the
//! procedural demo world.

pub mod dataset;
pub mod world;

//! posttrain: declarative LLM post-training experiments.
//!
//! An experiment file (TOML) describes a DAG of stages. [`experiment`] reads and
//! validates it, [`plan`] resolves the DAG and computes each stage's cache key,
//! [`store`] keeps finished stage outputs by key, [`runner`] executes what is
//! stale, [`stages`] holds one file per stage kind, [`chat`] the tokenizers
//! and chat templates both sides share, [`data`] the datasets and
//! the synthetic assistant world, [`model`] the Llama in dfdx, [`results`]
//! the result tables.

pub mod chat;
pub mod data;
pub mod experiment;
pub mod gguf;
pub mod memory;
pub mod model;
pub mod plan;
pub mod results;
pub mod runner;
pub mod stages;
pub mod store;
pub mod text;
pub mod time;
pub mod train;

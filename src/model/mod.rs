//! The model: a Llama decoder in dfdx with runtime-sized configuration,
//! Hugging Face checkpoint names, and scalar heads for reward and value
//! models. dfdx types stay inside `model/` and `train/`.

pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod decoder;
pub mod frozen;
pub mod gemm;
pub mod generate;
pub mod gguf_checkpoint;
pub mod host_ops;
pub mod kernels;
pub mod llama;
pub mod lora;
pub mod params;
pub mod score;
pub mod workers;

pub use checkpoint::CheckpointError;
pub use config::LlamaConfig;
pub use llama::TokenBatch;
pub use params::LlamaParams;

/// The tensor device: the CPU, or CUDA with the `cuda` feature.
#[cfg(not(feature = "cuda"))]
pub type Dev = dfdx::tensor::Cpu;
#[cfg(feature = "cuda")]
pub type Dev = dfdx::tensor::Cuda;

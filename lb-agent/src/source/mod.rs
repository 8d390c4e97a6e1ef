//! Where services come from. Sources never touch maps: they produce validated specs
//! that the model turns into the desired state.

pub mod file;

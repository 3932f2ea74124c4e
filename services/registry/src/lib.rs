//! flywheel-registry

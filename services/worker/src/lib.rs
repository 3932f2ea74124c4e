//! flywheel-worker

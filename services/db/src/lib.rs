//! flywheel-db

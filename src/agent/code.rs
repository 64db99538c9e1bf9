//! The guest's Python code interpreter (being written).

//! Service discovery by DNS for the tasks on this node (see the module docs of `overlay`).

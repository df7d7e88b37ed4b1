"""The model: presets and shards (config), weights, the token batch and its split (batch), the layers'
attention and MLP blocks (layers), the forward pass's buffers and steps (model), the MoE block (moe), and
the float64 NumPy reference every path is checked against (reference)."""

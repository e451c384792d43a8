"""A readable SiT (Scalable Interpolant Transformer) whose residual stream is delegated to a router.

The backbone follows SiT/DiT (patch embedding, fixed 2D sin-cos positions, adaLN-Zero blocks, final
layer) with one change: a block never adds anything to a running residual stream. For each of its two
sublayers it asks the router for the sublayer's input h_l and hands the router the sublayer's output
v_l (docs/method.md section 2). Which router it has (residual, unet, dar) is decided in router.py.
Not a script: every script builds its SiT through `create_model` or `checkpoint.load_model`.

    from model import SiT_models
    model = SiT_models["SiT-T/4"](input_size=32, in_channels=1, num_classes=10, router="dar", chunk=4)
    velocity = model(x, t, y)            # t in [0, 1]: 0 is noise, 1 is data

With router="residual" the parameter names and shapes are those of the SiT reference implementation,
so its released checkpoints load with strict=True; `load_backbone` puts them under any other router.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from router import build_router, modulate  # adaLN's modulate: the dynamic query uses it too


#################################################################################
#               Embedding layers for timesteps, class labels, patches            #
#################################################################################

class TimestepEmbedder(nn.Module):
    """t (a float per sample) -> 256-d sinusoidal features -> MLP -> hidden_size."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device=t.device) / half)
        args = t[:, None].double() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype)
        return self.mlp(t_freq)


class LabelEmbedder(nn.Module):
    """Class label -> hidden_size. Index `num_classes` is the null class used for classifier-free guidance."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels, train):
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """[B, C, H, W] -> [B, T, D] with T = (H / p) * (W / p), a strided convolution as in timm.

    Token-major in memory, unlike timm's transposed view: every op on the stream after it (the residual adds,
    LayerNorm, the linear layers) would otherwise follow the transposed layout and copy it, which cost a
    residual SiT-D/4 training step on CPU about 4% (docs/kernel-log.md)."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


#################################################################################
#                                 Core SiT Model                                #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention with the parameter names of timm's Attention (qkv, proj)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU, named as timm's Mlp (fc1, fc2)."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiTBlock(nn.Module):
    """Sublayers 2k-1 (attention) and 2k (MLP) of block k. method.md section 2:
    v_l = gate_l(c) * f_l(modulate(LN(h_l), shift_l(c), scale_l(c))), with h_l asked from the router."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, route, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h = route.read(shift_msa, scale_msa)
        route.write(gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(h), shift_msa, scale_msa)))
        h = route.read(shift_mlp, scale_mlp)
        route.write(gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(h), shift_mlp, scale_mlp)))


class FinalLayer(nn.Module):
    """Reads h_final, adaLN-modulates it and maps every token back to a p x p x C patch."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, route, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        h = route.read_final(shift, scale)
        return self.linear(modulate(self.norm_final(h), shift, scale))


class SiT(nn.Module):
    """SiT backbone. `router`, `query`, `chunk` (and `logit_scale`, an ablation) choose the cross-layer
    routing (router.build_router); `kernel` ("auto", "torch", "cpu", "triton") how DAR computes it
    (router.mix_sources)."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=False,
                 router="residual", query="static", chunk=1, kernel="auto", logit_scale="inv-sqrt-d"):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}: "
                             f"choose an image size that is a multiple of the patch size")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.input_size = input_size
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.depth = depth

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.grid_size = input_size // patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size ** 2, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([SiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        with torch.random.fork_rng(devices=[]):  # draws made here are discarded: one seed, one backbone, any router
            self.router = build_router(router, depth=depth, hidden_size=hidden_size, query=query, chunk=chunk,
                                       kernel=kernel, logit_scale=logit_scale)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        for part in (self.x_embedder, self.t_embedder, self.y_embedder, self.blocks, self.final_layer):
            part.apply(_basic_init)

        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every sublayer's output v_l starts at zero (the residual baseline starts as the identity).
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

        # The router initializes itself without random draws, and may ask for a zero e(t) (method.md section 3, timestep query).
        self.router.reset_parameters()
        if self.router.zero_timestep_embedding:
            nn.init.constant_(self.t_embedder.mlp[2].weight, 0)
            nn.init.constant_(self.t_embedder.mlp[2].bias, 0)

    def unpatchify(self, x):
        """[B, T, p*p*C] -> [B, C, H, W]."""
        c, p, g = self.out_channels, self.patch_size, self.grid_size
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x, t, y, return_hidden=None, trace=None):
        """Velocity prediction for x_t at time t with labels y (label `num_classes` = unconditional).

        return_hidden=k also returns the hidden state block k (1-based) hands on (the REPA hook,
        docs/method.md section 4). trace: a router.Trace to fill with every block's hidden state and the routing weights.
        """
        if return_hidden is not None and not 1 <= return_hidden <= self.depth:
            raise ValueError(f"repa depth (return_hidden) must be in 1..{self.depth}, got {return_hidden}")
        v0 = self.x_embedder(x) + self.pos_embed  # v_0 = h_0
        t_emb = self.t_embedder(t)
        c = t_emb + self.y_embedder(y, self.training)
        route = self.router.start(v0, t_emb, trace=trace, keep_hidden=return_hidden)
        for block in self.blocks:
            block(route, c)
        out = self.unpatchify(self.final_layer(route, c))
        if self.learn_sigma:
            out = out[:, : self.in_channels]
        if return_hidden is not None:
            return out, route.handed_on[return_hidden - 1]
        return out

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_channels=None):
        """Classifier-free guidance v = v_u + s (v_c - v_u); y holds the conditional labels.

        We guide every channel. SiT's released sampler (like DiT's) guides only channels 0-2 of its
        4-channel latents and returns the conditional prediction for the rest: cfg_channels=3 does that.
        """
        y_null = torch.full_like(y, self.num_classes)
        v = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]))
        v_cond, v_uncond = v.chunk(2)
        guided = v_uncond + cfg_scale * (v_cond - v_uncond)
        if cfg_channels is None:
            return guided
        return torch.cat([guided[:, :cfg_channels], v_cond[:, cfg_channels:]], dim=1)


def load_backbone(model, state_dict):
    """Load SiT backbone weights (e.g. a released residual checkpoint) into a model with any router.

    Every backbone tensor must be present with the right shape; router parameters keep their fresh
    initialization. A checkpoint with learn_sigma channels (8 for latents) loads into a 4-channel model
    by keeping the velocity half of the final projection. Returns the router parameter names left as they were.
    """
    state_dict = dict(state_dict)
    own = model.state_dict()
    for name in ("final_layer.linear.weight", "final_layer.linear.bias"):
        if name in state_dict and state_dict[name].shape[0] == 2 * own[name].shape[0] and not model.learn_sigma:
            p2 = model.patch_size ** 2
            kept = state_dict[name].reshape(p2, 2 * model.in_channels, *state_dict[name].shape[1:])
            state_dict[name] = kept[:, : model.in_channels].reshape(own[name].shape)
    unexpected = sorted(k for k in state_dict if k not in own)
    missing = sorted(k for k in own if k not in state_dict and not k.startswith("router."))
    if unexpected or missing:
        raise ValueError(f"state dict does not match this SiT backbone: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    wrong = [k for k in state_dict if state_dict[k].shape != own[k].shape]
    if wrong:
        raise ValueError("state dict shapes differ from this model's: " + ", ".join(
            f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:5]))
    router_keys = [k for k in own if k not in state_dict]
    model.load_state_dict(state_dict, strict=False)
    return router_keys


@torch.no_grad()
def update_ema(ema_model, model, decay):
    """theta_ema <- decay * theta_ema + (1 - decay) * theta, for every parameter."""
    for ema_param, param in zip(ema_model.parameters(), model.parameters()):
        ema_param.lerp_(param.detach(), 1 - decay)


#################################################################################
#                          Sine/Cosine Positional Embedding                      #
#################################################################################

def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """[grid_size**2, embed_dim]: half the channels encode the row, half the column (MAE convention)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb_h = get_1d_sincos_pos_embed(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def get_1d_sincos_pos_embed(embed_dim, pos):
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


#################################################################################
#                                   SiT Configs                                 #
#################################################################################

# name: (depth, hidden_size, num_heads). S/B/L/XL are SiT's; T (tiny), D (deep-tiny) and N6..N48 (narrow: the
# depth series of docs/study-deep.md, one width so that only depth changes) train on a laptop CPU.
SIT_SIZES = {
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
    "T": (12, 128, 4),
    "D": (24, 96, 4),
    **{f"N{depth}": (depth, 64, 4) for depth in (6, 12, 24, 48)},
}
TINY_SIZES = ("T", "D", "N6", "N12", "N24", "N48")  # the CPU configs: train.py gives them lr 1e-3 and EMA 0.995


def _make_config(depth, hidden_size, num_heads, patch_size):
    def build(**kwargs):
        return SiT(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size, **kwargs)
    return build


SiT_models = {f"SiT-{size}/{p}": _make_config(*SIT_SIZES[size], p) for size in SIT_SIZES for p in (2, 4, 8)}


def create_model(name, **kwargs):
    """SiT_models[name](**kwargs) with a clear error for an unknown config name."""
    if name not in SiT_models:
        raise ValueError(f"unknown model config {name!r}; choose one of: {', '.join(SiT_models)}")
    return SiT_models[name](**kwargs)

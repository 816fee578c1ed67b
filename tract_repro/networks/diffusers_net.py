"""diffusers teachers behind the project's network interface: F(x_t, λ, labels, cond) of a UNet2DConditionModel
(text-to-image, or class-conditional through ``num_class_embeds``) or a DiT (``DiTTransformer2DModel``,
``Transformer2DModel`` with ada_norm_zero).

The network is fed the fractional timestep τ = schedule.timestep(λ) of the teacher's own
:class:`~tract_repro.diffusion.schedules.DiscreteSchedule` (λ arrives in float64), and its output is what the
denoiser's parameterisation reads (ε for Stable Diffusion, v after Meng et al.'s v fine-tune); a DiT's learned-σ
channels are dropped.  Conditioning: ``labels`` (B,) and, for a text model, ``cond['text']`` (B, L, D), the CLIP
text encoder's ``last_hidden_state`` of each caption.  The label ``NULL_LABEL`` (−1) means ∅: a text model
then gets the empty prompt's embedding (``empty_text``, a buffer saved with the weights, computed once from the
folder's own tokenizer and text encoder, padded to their maximum length: Stable Diffusion's convention), a
class model its null class (the last of a UNet's ``num_class_embeds`` rows; a DiT's row ``num_classes``).  So
label dropout and the guided denoiser work on these networks as on the PD UNet.

Guidance weight w (guided distillation's student): a UNet built with diffusers' ``time_cond_proj_dim`` = D takes
``cond['w']`` (B,) as ``timestep_cond``, the guidance embedding e(w) of :func:`guidance_embedding` (the latent
consistency pipelines' embedding of their w = s − 1, which is ours); ``time_embedding.cond_proj`` (Linear(D, C),
no bias) adds it to the timestep features.  ``diffusers_network.time_cond_proj_dim`` adds that input to a folder's
or config's UNet with ``cond_proj`` at zero, so the student computes its teacher exactly at every w.  A DiT gets the
same knob: each ``CombinedTimestepLabelEmbeddings`` (every block's ``norm1.emb``; the output head reuses block 0's)
gets a ``cond_proj`` (Linear(D, 256), no bias, zero) whose cond_proj(e(w)) is added to the sinusoidal timestep
features before ``timestep_embedder`` (:mod:`tract_repro.networks.w_input`).

Nothing here is read above ``networks/``: the loop, methods and samplers see a network like any other.
"""
import importlib.util
import json
from pathlib import Path

import gin
import torch
from torch import nn

from tract_repro.common.errors import ConfigError
from tract_repro.diffusion.schedules import DiscreteSchedule
from tract_repro.networks.conditioning import NULL_LABEL
from tract_repro.networks.w_input import GuidedLabels, guidance_embedding, guided_embeddings, with_w_input

#: the diffusers classes this adapter wraps, and the model_index.json component that holds each
MODELS = {"UNet2DConditionModel": "unet", "DiTTransformer2DModel": "transformer", "Transformer2DModel": "transformer"}
WEIGHTS = "diffusion_pytorch_model.safetensors"
HUB_HINT = "e.g. `huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir {folder}`"


class DiffusersNet(nn.Module):
    """F(x_t, λ, labels, cond) = model(x_t, τ(λ), context)[:, :in_channels] for a diffusers ``model``.

    ``schedule``: the teacher's DiscreteSchedule (λ → τ).  ``empty_text`` (1, L, D): the empty prompt's
    embedding, for a text model (a UNet without class embeddings); None for a class model.  ``folders``: where the
    components came from, {'model': the diffusers folder of the UNet (and its VAE), 'text': the folder of the
    tokenizer and text encoder}, None where there is none (an export copies the VAE and text components from them).
    A UNet with ``time_cond_proj_dim``, or a DiT given the w input by :func:`with_w_input`, takes the guidance weight:
    ``extra_conditions`` = ('w',).
    """

    #: the denoiser passes λ in float64, so τ is exact at the trained timesteps
    logsnr_dtype = torch.float64
    num_outputs = 1
    extra_conditions = ()
    #: the binding that removes the w input (named when a teacher without one is loaded into a student with one)
    w_input_setting = "unset diffusers_network.time_cond_proj_dim"

    def __init__(self, model, schedule, empty_text=None, gradient_checkpointing=False, folders=None):
        super().__init__()
        self.folders = {"model": None, "text": None, **(folders or {})}
        name = type(model).__name__
        if name not in MODELS:
            raise ConfigError(f"diffusers_network wraps {', '.join(MODELS)}, got {name}")
        config = model.config
        self.model, self.schedule = model, schedule
        self.in_channels = int(config.in_channels)
        self.resolution = int(config.sample_size)  # the latent side the model was trained on (evaluation's image shape)
        self.is_unet = name == "UNet2DConditionModel"
        if self.is_unet:
            for key in ("addition_embed_type", "class_embed_type", "encoder_hid_dim_type"):
                if config.get(key) is not None:
                    raise ConfigError(f"this UNet has {key} = {config.get(key)!r} (SDXL-style or other added "
                                      f"conditioning), which diffusers_network does not feed: use an SD 1.x/2.x-style "
                                      f"UNet2DConditionModel")
            classes = config.get("num_class_embeds")
            self.text = classes is None
            self.num_classes = 1 if self.text else int(classes) - 1  # the last row is the null class ∅
            self.has_null = not self.text
            if config.get("time_cond_proj_dim") is not None:
                self.extra_conditions = ("w",)
        else:
            if config.get("norm_type") != "ada_norm_zero" or not config.get("num_embeds_ada_norm"):
                raise ConfigError(f"{name} is wrapped as a class-conditional DiT (norm_type 'ada_norm_zero', "
                                  f"num_embeds_ada_norm classes); got norm_type {config.get('norm_type')!r}")
            self.text, self.num_classes = False, int(config.num_embeds_ada_norm)
            self.has_null = self._label_dropout_off()
            if guided_embeddings(model):
                self.extra_conditions = ("w",)
        if self.text:
            if empty_text is None:
                raise ConfigError("a text-to-image UNet needs the empty prompt's embedding for ∅: load it from a "
                                  "diffusers folder with tokenizer/ and text_encoder/ (diffusers_network.folder), or "
                                  "set diffusers_network.empty_text_from to one")
            if empty_text.shape[-1] != config.cross_attention_dim:
                raise ConfigError(f"the text encoder's hidden_size {empty_text.shape[-1]} is not the UNet's "
                                  f"cross_attention_dim {config.cross_attention_dim}: use the text encoder the UNet "
                                  f"was trained with")
            self.register_buffer("empty_text", empty_text.detach().float().reshape(1, *empty_text.shape[-2:]))
        self.conditional = self.text or self.num_classes > 1
        if gradient_checkpointing:
            model.enable_gradient_checkpointing()
        check_sdpa(model)

    def _label_dropout_off(self):
        """Switch off a DiT's own label dropout (∅ is the caller's: TeacherTraining.p_uncond); whether it has a null row."""
        from diffusers.models.embeddings import LabelEmbedding

        null = False
        for module in self.model.modules():
            if isinstance(module, LabelEmbedding):
                null = module.embedding_table.num_embeddings > self.num_classes
                module.dropout_prob = 0.0
        return null

    def forward(self, x, logsnr, labels=None, cond=None):
        cond = dict(cond or {})
        unknown = set(cond) - ({"text"} if self.text else set()) - set(self.extra_conditions)
        if unknown:
            what = ("text" if self.text else "class labels") + (" and w" if self.extra_conditions else "")
            raise ConfigError(f"this diffusers network takes {what}, not {sorted(unknown)}")
        tau = self.schedule.timestep(logsnr).float()
        n = x.shape[0]
        w = self.w_input(cond.get("w"))
        if self.text:
            out = self.model(x, tau, encoder_hidden_states=self.context(labels, cond.get("text"), n), return_dict=False,
                             **w)[0]
        elif self.is_unet:  # a class model's cross-attention, if any, attends to one zero token
            context = x.new_zeros(n, 1, self.model.config.cross_attention_dim)
            out = self.model(x, tau, encoder_hidden_states=context, class_labels=self.class_index(labels),
                             return_dict=False, **w)[0]
        else:  # a DiT's w rides with its labels into every patched embedding (no state left between calls)
            labels = self.class_index(labels)
            if w:
                labels = GuidedLabels(labels, w["timestep_cond"])
            out = self.model(x, timestep=tau, class_labels=labels, return_dict=False)[0]
        return out[:, :self.in_channels]  # a DiT's learned-σ channels dropped

    def w_input(self, w):
        """The guidance weight as {'timestep_cond': e(w)} for a model with the w input (the UNet's keyword; a DiT's
        patched embeddings read it from :class:`GuidedLabels`), else {}."""
        if not self.extra_conditions:
            return {}
        if w is None:
            raise ConfigError("this diffusers network takes a guidance weight w (time_cond_proj_dim) that was not "
                              "given: sample it with one (e.g. evaluate --w ...)")
        if self.is_unet:
            proj = self.model.time_embedding.cond_proj.weight
        else:
            proj = guided_embeddings(self.model)[0][1].cond_proj.weight
        return {"timestep_cond": guidance_embedding(w, proj.shape[1]).to(proj.device, proj.dtype)}

    def fresh_prefixes(self, names):
        """Where the branches of the new inputs ``names`` are in this network's state dict (w: diffusers' cond_proj
        of a UNet; each patched timestep-label embedding's cond_proj of a DiT with the w input)."""
        if "w" not in names:
            return ()
        if self.is_unet:
            return ("model.time_embedding.cond_proj.",)
        return tuple(f"model.{name}.cond_proj." for name, _ in guided_embeddings(self.model))

    def context(self, labels, text, n):
        """The text embeddings (B, L, D): each caption's, or the empty prompt's where the label is ∅ (or no text)."""
        empty = self.empty_text.expand(n, -1, -1)
        if text is None:
            if labels is not None and bool((labels != NULL_LABEL).any()):
                raise ConfigError("this text-to-image network needs caption embeddings cond.extra['text'] (B, L, D) "
                                  "for every sample whose label is not ∅ (−1): use a data set with captions")
            return empty
        if tuple(text.shape[1:]) != tuple(empty.shape[1:]):
            raise ConfigError(f"caption embeddings of shape {tuple(text.shape[1:])} given to a UNet whose empty "
                              f"prompt is {tuple(empty.shape[1:])}: encode captions with the model's own text "
                              f"encoder, padded to its maximum length")
        if labels is None:
            return text
        return torch.where((labels == NULL_LABEL).view(-1, 1, 1), empty.to(text.dtype), text)

    def class_index(self, labels):
        """Class labels as the model's embedding rows, ∅ (−1) as its null class (row num_classes)."""
        if labels is None:
            raise ConfigError(f"this diffusers network is class-conditional ({self.num_classes} classes): labels are "
                              f"required")
        labels = labels.long()
        null = labels == NULL_LABEL
        if not self.has_null and bool(null.any()):
            raise ConfigError("this DiT has no null class ∅ (it was built without label dropout): it cannot predict "
                              "x̂(x_t, ∅)")
        return torch.where(null, torch.full_like(labels, self.num_classes), labels)


def check_sdpa(model):
    """Every attention layer runs PyTorch's scaled_dot_product_attention (diffusers' default processor)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    other = {type(m.processor).__name__ for m in model.modules() if isinstance(m, Attention)
             and not isinstance(m.processor, AttnProcessor2_0)}
    if other:
        raise ConfigError(f"attention processors {sorted(other)} are set where diffusers' default AttnProcessor2_0 "
                          f"(scaled_dot_product_attention) is expected: use torch ≥ 2 and leave the processors as "
                          f"diffusers sets them")


@gin.configurable
def diffusers_network(folder=None, config=None, empty_text_from=None, schedule=None, gradient_checkpointing=False,
                      time_cond_proj_dim=None):
    """The network of a local diffusers ``folder`` (its pretrained weights, scheduler and, for a text model, the
    empty prompt from its tokenizer and text encoder), or a fresh one from a ``config`` dict (its ``_class_name``,
    UNet2DConditionModel by default; ``schedule`` a DiscreteSchedule, ``empty_text_from`` a folder with tokenizer/
    and text_encoder/ for a text model).  ``gradient_checkpointing``: diffusers' own.  ``time_cond_proj_dim``: the
    UNet or DiT gets the guidance-weight input w (e(w) of that width, :func:`with_w_input`), its branch at zero."""
    if (folder is None) == (config is None):
        raise ConfigError("diffusers_network needs exactly one of folder (a local diffusers folder) and config "
                          "(a model config dict, to train from scratch)")
    if folder is not None:
        return load_folder(folder, empty_text_from, gradient_checkpointing, time_cond_proj_dim)
    return from_config(config, empty_text_from, DiscreteSchedule() if schedule is None else schedule,
                       gradient_checkpointing, time_cond_proj_dim)


def from_config(config, empty_text_from, schedule, gradient_checkpointing=False, time_cond_proj_dim=None):
    """A freshly initialised :class:`DiffusersNet` from a model config dict (``_class_name`` picks the class)."""
    config = dict(config)
    cls = model_class(config.pop("_class_name", "UNet2DConditionModel"), "diffusers_network.config")
    if cls.__name__ == "Transformer2DModel" and "norm_type" not in config:  # diffusers' class lookup would KeyError
        raise ConfigError("diffusers_network.config for a Transformer2DModel needs norm_type 'ada_norm_zero' and "
                          "num_embeds_ada_norm (a class-conditional DiT)")
    model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    if time_cond_proj_dim is not None:
        model = with_w_input(model, time_cond_proj_dim, "diffusers_network.config")
    empty = None
    if cls.__name__ == "UNet2DConditionModel" and config.get("num_class_embeds") is None and empty_text_from is not None:
        check_text_encoder(Path(empty_text_from), model.config)
        empty = empty_prompt(Path(empty_text_from))
    return DiffusersNet(model, schedule, empty, gradient_checkpointing,
                        folders={"text": Path(empty_text_from) if empty is not None else None})


def model_class(name, where):
    import diffusers

    if name not in MODELS:
        raise ConfigError(f"{where} names {name!r}: diffusers_network wraps {', '.join(MODELS)}")
    return getattr(diffusers, name)


def read_config(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


def folder_layout(folder):
    """(component, model class name, model config) of a diffusers folder, checked before any weights are read."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        single = sorted(p.name for p in folder.glob("*") if p.suffix in (".ckpt", ".safetensors", ".bin", ".pt"))
        found = f" (single-file checkpoints such as {single[0]} are not read)" if single else ""
        raise ConfigError(f"{folder} is not a diffusers folder: it has no model_index.json{found}; fetch the model's "
                          f"diffusers layout (model_index.json, unet/ or transformer/, scheduler/, vae/, and "
                          f"text_encoder/ with tokenizer/ for a text model) into {folder}, {HUB_HINT.format(folder=folder)}")
    index = read_config(folder / "model_index.json")
    found = [(key, value[1]) for key, value in index.items() if isinstance(value, list) and len(value) == 2
             and value[1] in MODELS and MODELS[value[1]] == key]
    if not found:
        raise ConfigError(f"{folder}/model_index.json lists no {' or '.join(MODELS)} under unet or transformer: "
                          f"diffusers_network needs a UNet or DiT pipeline folder")
    component, name = found[0]
    config = read_config(folder / component / "config.json")
    vae = folder / "vae" / "config.json"
    if "vae" in index and vae.is_file():
        latent = read_config(vae).get("latent_channels")
        if latent is not None and latent != config.get("in_channels"):
            raise ConfigError(f"{folder}: the VAE's latent_channels = {latent} but the {component} takes in_channels = "
                              f"{config.get('in_channels')}: fetch the VAE this model was trained with into {folder / 'vae'}")
    return component, name, config


def weights_file(folder):
    """The safetensors weights of a diffusers folder's UNet or DiT (or a pickle that loads with weights_only=True)."""
    component, _, _ = folder_layout(folder)
    directory = Path(folder) / component
    for path in (directory / WEIGHTS, directory / f"{WEIGHTS}.index.json"):  # one file, or shards and their index
        if path.is_file():
            return path
    variants = sorted(directory.glob("*.safetensors"))
    if variants:
        raise ConfigError(f"{directory} holds {variants[0].name} but not {WEIGHTS}: fetch the float32 weights "
                          f"{WEIGHTS} into {directory}")
    pickles = sorted(p for p in directory.glob("*") if p.suffix in (".bin", ".ckpt", ".pt", ".pth"))
    if not pickles:
        raise ConfigError(f"{directory} has no weights: fetch {WEIGHTS} into {directory}")
    try:
        torch.load(pickles[0], map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 (any refusal of the safe loader is the same fault for the user)
        raise ConfigError(f"{pickles[0]} is a pickle that torch.load(weights_only=True) refuses (it could run code): "
                          f"fetch {WEIGHTS} into {directory}") from None
    return pickles[0]


def load_folder(folder, empty_text_from=None, gradient_checkpointing=False, time_cond_proj_dim=None):
    """The :class:`DiffusersNet` of a diffusers folder, with its pretrained weights (and, given
    ``time_cond_proj_dim``, a w input at zero); one line for what does not fit."""
    folder = Path(folder)
    component, name, config = folder_layout(folder)
    text = name == "UNet2DConditionModel" and config.get("num_class_embeds") is None
    source = Path(empty_text_from) if empty_text_from is not None else folder
    if text:
        check_text_encoder(source, config)
    schedule = DiscreteSchedule.from_diffusers_config(folder)
    path = weights_file(folder)
    cls = model_class(name, str(folder / component / "config.json"))
    if path.name.startswith(WEIGHTS):
        lazy = importlib.util.find_spec("accelerate") is not None  # diffusers warns when it cannot load lazily
        model = cls.from_pretrained(folder, subfolder=component, use_safetensors=True, low_cpu_mem_usage=lazy)
    else:  # a pickle that the safe loader has accepted
        model = cls.from_config(cls.load_config(folder / component))
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except RuntimeError:
            raise ConfigError(f"{path} does not fit {folder / component / 'config.json'} (older key names?): fetch "
                              f"{WEIGHTS} into {folder / component}") from None
    if time_cond_proj_dim is not None:
        model = with_w_input(model, time_cond_proj_dim, str(folder / component))
    model.eval()
    return DiffusersNet(model, schedule, empty_prompt(source) if text else None, gradient_checkpointing,
                        folders={"model": folder, "text": source if text else None})


def check_text_encoder(folder, unet_config):
    """A text model's folder has a tokenizer and a text encoder whose width is the UNet's cross_attention_dim."""
    encoder = folder / "text_encoder" / "config.json"
    if not encoder.is_file() or not (folder / "tokenizer").is_dir():
        raise ConfigError(f"{folder} has no text_encoder/ and tokenizer/ to compute the empty prompt's embedding ∅ of "
                          f"this text-to-image UNet: fetch them into {folder}, or set diffusers_network.empty_text_from "
                          f"to a folder that has them")
    width = read_config(encoder).get("hidden_size")
    if width != unet_config.get("cross_attention_dim"):
        raise ConfigError(f"{folder}: the text encoder's hidden_size = {width} but the UNet's cross_attention_dim = "
                          f"{unet_config.get('cross_attention_dim')}: fetch the text encoder this UNet was trained with")


@torch.no_grad()
def empty_prompt(folder):
    """The empty prompt's CLIP embedding (1, L, D): ``last_hidden_state`` of "" padded to the tokenizer's max length."""
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True).eval()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the tokenizer and text encoder of {folder} ({' '.join(str(exc).split())[:200]}): "
                          f"fetch tokenizer/ and text_encoder/model.safetensors into {folder}") from None
    ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return encoder(ids).last_hidden_state.float()


#: diffusers' prediction_type → the parameterisation of the denoiser contract
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x"}


def folder_of(path):
    """The diffusers folder whose UNet or DiT weights ``path`` is, or None."""
    path = Path(path)
    folder = path.parent.parent
    if path.parent.name in set(MODELS.values()) and (folder / "model_index.json").is_file():
        return folder
    return None


def folder_process(folder):
    """The parameterisation (from the scheduler's prediction_type) and noise schedule a diffusers model was trained with."""
    from tract_repro.diffusion.schedules import scheduler_config_path

    prediction = read_config(scheduler_config_path(folder)).get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise ConfigError(f"{folder}: prediction_type {prediction!r} is not one of {', '.join(PREDICTIONS)}")
    return dict(parameterisation=PREDICTIONS[prediction], noise_schedule=DiscreteSchedule.__name__)


def folder_state(folder):
    """A diffusers folder's weights as a :class:`DiffusersNet` state dict (model.… and empty_text)."""
    return load_folder(folder).state_dict()

"""The prompts: one Jinja file a style in phi_jax/synth/templates/ (names starting with _ are parts
that styles include). `--templates DIR` puts DIR first: a file there replaces the built-in style of
its name, and a new file is a new style. Copy the built-ins with `phi-jax data synth --copy_templates DIR`.

A template sees topic, subtopic (or None), audience (its description, plan.AUDIENCES), audience_name,
style, extract (a web extract, or None) and api ("completions", "chat" or "checkpoint").
"""

import pathlib
import shutil

from phi_jax.synth import SynthError

BUILTIN_DIR = pathlib.Path(__file__).parent / "templates"
SUFFIX = ".jinja"


class Templates:
    def __init__(self, user_dir=None):
        import jinja2

        dirs = [pathlib.Path(user_dir)] if user_dir else []
        for d in dirs:
            if not d.is_dir():
                raise SynthError(f"--templates {d}: not a directory")
        dirs.append(BUILTIN_DIR)
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader([str(d) for d in dirs]),
                                      undefined=jinja2.StrictUndefined, keep_trailing_newline=False,
                                      autoescape=False)
        self.styles = sorted({p.name[:-len(SUFFIX)] for d in dirs for p in d.glob(f"*{SUFFIX}")
                              if not p.name.startswith("_")})

    def check_styles(self, styles) -> None:
        unknown = [s for s in styles if s not in self.styles]
        if unknown:
            raise SynthError(f"--styles: no template for {', '.join(unknown)} (the styles are: "
                             f"{', '.join(self.styles)}; add DIR/<style>{SUFFIX} with --templates DIR)")

    def render(self, entry: dict, audience_description: str, api: str) -> str:
        import jinja2

        try:
            template = self.env.get_template(entry["style"] + SUFFIX)
            return template.render(topic=entry["topic"], subtopic=entry["subtopic"], audience=audience_description,
                                   audience_name=entry["audience"], style=entry["style"], extract=entry["extract"],
                                   api=api).strip()
        except jinja2.TemplateError as e:
            where = getattr(e, "filename", None) or entry["style"] + SUFFIX
            line = getattr(e, "lineno", None)
            raise SynthError(f"template {where}{f':{line}' if line else ''}: {e}") from None


def copy_builtin(dest) -> list[pathlib.Path]:
    """Copies the built-in templates into `dest` (which must not hold files of those names)."""
    dest = pathlib.Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    sources = sorted(BUILTIN_DIR.glob(f"*{SUFFIX}"))
    clashes = [dest / s.name for s in sources if (dest / s.name).exists()]
    if clashes:
        raise SynthError(f"--copy_templates {dest}: {clashes[0]} already exists; copy into an empty directory")
    for source in sources:
        shutil.copyfile(source, dest / source.name)
    return [dest / s.name for s in sources]

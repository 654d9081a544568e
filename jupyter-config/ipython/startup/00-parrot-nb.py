# Installed by parrot-nb into <prefix>/etc/ipython/startup: declares %%semantic and %parrot
# lazily, so parrot_nb is imported only when a cell first uses one of them.
def _parrot_nb_register_lazy_magics() -> None:
    try:
        ip = get_ipython()  # noqa: F821 (defined in IPython's namespace)
    except NameError:
        return
    manager = getattr(ip, "magics_manager", None)
    if manager is None or not hasattr(manager, "register_lazy"):
        return  # IPython too old for lazy magics: `%load_ext parrot_nb` still works
    manager.register_lazy("semantic", "parrot_nb", "cell")
    manager.register_lazy("parrot", "parrot_nb", "line")


_parrot_nb_register_lazy_magics()
del _parrot_nb_register_lazy_magics

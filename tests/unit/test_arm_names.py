"""An arm's one name (arms.arm_names) and the folder prefix derived from it (arms.arm_slugs)."""

from __future__ import annotations

from diffusers_optim.arms import arm_names, arm_slugs

ADAM = {"optimizer": "adam", "learning_rate": 1e-3}


def adam(optimizer_args: str, **settings) -> dict:
    return {**ADAM, "optimizer_args": optimizer_args, **settings}


def test_a_name_says_the_optimizer_and_only_the_hyperparameter_that_differs():
    names = arm_names([adam("betas=(0.5,0.999),eps=1e-08,weight_decay=0.0"),
                       adam("betas=(0.9,0.999),eps=1e-08,weight_decay=0.0")])
    assert names == ["adam betas=(0.5,0.999)", "adam betas=(0.9,0.999)"]
    assert arm_slugs(names) == ["adam-betas=0.5-0.999", "adam-betas=0.9-0.999"]


def test_generic_flags_read_as_the_optimizer_names_them_and_its_own_settings_stay_out():
    assert arm_names([adam("eps=1e-08", adam_beta1=0.5), adam("eps=1e-08", adam_beta1=0.9)]) == [
        "adam beta1=0.5", "adam beta1=0.9"]
    # another optimizer: what each one fixes on its own (its lr, its hyperparameters) is not part of the names
    sgd = {"optimizer": "sgd", "learning_rate": 0.05, "optimizer_args": "momentum=0.9", "lr_warmup_steps": 100}
    assert arm_names([adam("eps=1e-08", lr_warmup_steps=100), sgd]) == ["adam", "sgd"]
    assert arm_names([adam("eps=1e-08", lr_warmup_steps=0), sgd]) == ["adam lr_warmup_steps=0",
                                                                       "sgd lr_warmup_steps=100"]


def test_an_optimizers_own_lr_is_named_only_when_two_arms_of_it_differ():
    sgd = {"optimizer": "sgd", "optimizer_args": "momentum=0.9", "learning_rate": 0.05}
    assert arm_names([ADAM, sgd]) == ["adam", "sgd"]
    assert arm_names([ADAM, sgd, {**sgd, "learning_rate": 0.01}]) == ["adam lr=0.001", "sgd lr=0.05", "sgd lr=0.01"]


def test_arms_are_never_merged_under_one_name():
    # values that read alike at 6 digits, then settings that read the same (1e-3 written two ways)
    assert arm_names([adam("eps=1.0000001e-08"), adam("eps=1.0000002e-08")]) == [
        "adam eps=1.0000001e-08", "adam eps=1.0000002e-08"]
    assert arm_names([adam("lr=1e-3"), adam("lr=0.001")]) == ["adam #1", "adam #2"]
    assert arm_slugs(["adam x=(1,2)", "adam x=1-2"]) == ["adam-x=1-2-1", "adam-x=1-2-2"]


def test_folder_slugs_never_collide():
    from diffusers_optim.arms import arm_slugs

    for names in (["a", "a", "a-2"], ["a-1", "a", "a"], ["x y", "x_y", "x-y"]):
        slugs = arm_slugs(names)
        assert len(set(slugs)) == len(slugs), (names, slugs)

"""The feature names the objectives hand to the loss modules are written once, in `training.losses`, and agree with
what the loss modules take and the models return."""

import dataclasses
import inspect

from modeling_cloc import CLOCModel, CLOCOutput
from modeling_occlip.modeling_occlip import OCCLIPGraphFeatures
from training.losses import CLOCLoss, OCCLIPLoss
from training.objectives import CLOCObjective, OCCLIPObjective


def test_cloc_feature_names_are_the_loss_arguments_and_the_model_outputs():
    loss_arguments = list(inspect.signature(CLOCLoss.forward).parameters)[2:]  # after self, model
    assert list(CLOCLoss.feature_names) == loss_arguments
    # The single-process loss on the model takes the same features in the same order.
    assert list(inspect.signature(CLOCModel.loss_from_features).parameters)[1:] == loss_arguments
    outputs = {field.name for field in dataclasses.fields(CLOCOutput)}
    assert set(CLOCLoss.feature_names) - outputs == {"input_boxes"}  # taken from the batch
    assert CLOCObjective._keys == CLOCLoss.feature_names


def test_occlip_text_features_are_every_graph_field_and_the_gathered_ones_all_but_the_local_ids():
    graph_fields = [field.name for field in dataclasses.fields(OCCLIPGraphFeatures)]
    assert sorted(OCCLIPObjective._text_keys) == sorted(graph_fields)
    assert set(graph_fields) - set(OCCLIPLoss.gathered_text_names) == {"relation_predicate_id"}

"""The DQN tutorial's update, on random transitions instead of a gym environment: a policy network
trained by the optimizer, and a target network (a copy, never trained, synced every 10 steps) whose
values are computed under torch.no_grad(); actions are picked with the policy network under
no_grad. Correct: the target network is not a model being evaluated."""
# guard-labels: none
import copy
import random

import torch
import torch.nn as nn
import torch.optim as optim

torch.manual_seed(0)
random.seed(0)
n_observations, n_actions, BATCH_SIZE, GAMMA, TAU = 6, 3, 32, 0.99, 0.005


class DQN(nn.Module):
    def __init__(self, n_observations, n_actions):
        super().__init__()
        self.layer1 = nn.Linear(n_observations, 128)
        self.layer2 = nn.Linear(128, 128)
        self.layer3 = nn.Linear(128, n_actions)

    def forward(self, x):
        x = torch.relu(self.layer1(x))
        x = torch.relu(self.layer2(x))
        return self.layer3(x)


policy_net = DQN(n_observations, n_actions)
target_net = copy.deepcopy(policy_net)
optimizer = optim.AdamW(policy_net.parameters(), lr=1e-4, amsgrad=True)
memory = [(torch.randn(n_observations), random.randrange(n_actions), random.random(),
           torch.randn(n_observations)) for _ in range(500)]


def select_action(state, eps=0.1):
    if random.random() > eps:
        with torch.no_grad():
            return policy_net(state).max(1).indices.view(1, 1)
    return torch.tensor([[random.randrange(n_actions)]])


def optimize_model():
    batch = random.sample(memory, BATCH_SIZE)
    state_batch = torch.stack([b[0] for b in batch])
    action_batch = torch.tensor([[b[1]] for b in batch])
    reward_batch = torch.tensor([b[2] for b in batch])
    next_states = torch.stack([b[3] for b in batch])
    state_action_values = policy_net(state_batch).gather(1, action_batch)
    with torch.no_grad():
        next_state_values = target_net(next_states).max(1).values
    expected_state_action_values = (next_state_values * GAMMA) + reward_batch
    criterion = nn.SmoothL1Loss()
    loss = criterion(state_action_values, expected_state_action_values.unsqueeze(1))
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_value_(policy_net.parameters(), 100)
    optimizer.step()
    return loss.item()


for step in range(150):
    action = select_action(torch.randn(1, n_observations))
    loss = optimize_model()
    # soft update of the target network's weights
    target_net_state_dict = target_net.state_dict()
    policy_net_state_dict = policy_net.state_dict()
    for key in policy_net_state_dict:
        target_net_state_dict[key] = policy_net_state_dict[key] * TAU + target_net_state_dict[key] * (1 - TAU)
    target_net.load_state_dict(target_net_state_dict)
    if step % 50 == 0:
        print(f"step {step}: loss {loss:.4f}, action {action.item()}")
